"""Answers a gateway or a broken proxy can give, from a real socket server on loopback:
an answer dripped a byte at a time (each within the timeout), one far too large, a
redirect that turns the POST into a GET. None may hold the sender, fill the app's
memory, or be mistaken for a success."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from meter_core import BackendUnavailable, MeterClient
from meter_core.transport import MAX_LOOKUP_ANSWER, HTTPTransport

Handler = Callable[[str, str, bytes], bytes | Callable[[socket.socket], None]]


def _ok_offsets(body: bytes) -> bytes:
    count = len(json.loads(body)["records"])
    answer = json.dumps({"offsets": [{"partition": 0, "offset": 1}] * count}).encode()
    return _http(200, answer)


def _http(status: int, body: bytes, **headers: str) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _drip(data: bytes, every: float) -> Callable[[socket.socket], None]:
    def send(conn: socket.socket) -> None:
        for byte in data:
            conn.sendall(bytes([byte]))
            time.sleep(every)

    return send


@contextlib.contextmanager
def _server(handle: Handler) -> Iterator[str]:
    """A keep-alive HTTP/1.1 server: ``handle(method, path, body)`` gives the raw
    answer, or a function that writes it to the socket itself."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with contextlib.suppress(OSError), conn:
            while not stop.is_set():
                line = reader.readline()
                if not line:
                    return
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", 0)))
                method, path = line.decode().split()[:2]
                answer = handle(method, path, body)
                if callable(answer):
                    answer(conn)
                else:
                    conn.sendall(answer)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def _account(path: str) -> bytes:
    return _http(200, json.dumps({"id": f"c-{path.rsplit('/', 1)[1]}"}).encode())


def test_an_answer_dripped_byte_by_byte_is_cut_off_and_the_next_batch_goes() -> None:
    # Each byte came within the timeout, so requests waited for ever: every event of
    # the process behind that one request, with no line in the log.
    dripped = threading.Event()

    def handle(method: str, path: str, body: bytes) -> bytes | Callable[[socket.socket], None]:
        if method == "GET":
            return _account(path)
        if not dripped.is_set():
            dripped.set()
            return _drip(_ok_offsets(body), every=0.2)
        return _ok_offsets(body)

    with _server(handle) as url:
        transport = HTTPTransport(url, internal_url=url, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"no whole answer within 1s .* cut off"):
            transport.produce([{"key": "c", "value": {"n": 1}}])
        assert time.monotonic() - started < 5  # (the drip alone would take some 12 s)
        client = MeterClient(kafka_url=url, internal_url=url, device_id="d", timeout=0.5)
        try:
            ids = [client.record(tenant_id="t", meter_id="page.processed.basic",
                                 total_usage=1) for _ in range(3)]  # fmt: skip
            assert client.flush(timeout=10)
            assert client.stats()["sent"] == len(ids)
        finally:
            client.close()


def test_headers_dripped_are_cut_off_too() -> None:
    def handle(method: str, path: str, body: bytes) -> bytes | Callable[[socket.socket], None]:
        return _drip(_account(path), every=0.2)  # (the status line and headers too)

    with _server(handle) as url:
        transport = HTTPTransport(url, internal_url=url, timeout=0.4)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="cut off"):
            transport.lookup_customer("acme")
        # a GET is tried up to 3 times by urllib3, each within two timeouts
        assert time.monotonic() - started < 3 * 0.8 + 2


@pytest.mark.parametrize("with_length", [True, False])
def test_a_lookup_answer_far_too_large_is_a_malformed_reply_not_read_whole(
    with_length: bool,
) -> None:
    sent: list[int] = []

    def handle(method: str, path: str, body: bytes) -> Callable[[socket.socket], None]:
        def send(conn: socket.socket) -> None:
            head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            head += "Content-Length: 268435456\r\n" if with_length else "Connection: close\r\n"
            conn.sendall((head + "\r\n").encode() + b'{"id": "')
            chunk = b"x" * 65536
            with contextlib.suppress(OSError):
                for _ in range(4096):  # 256 MB, unless the reader stops
                    conn.sendall(chunk)
                    sent.append(len(chunk))
            conn.close()

        return send

    with _server(handle) as url:
        transport = HTTPTransport(url, internal_url=url, timeout=2)
        with pytest.raises(BackendUnavailable, match="malformed reply: an answer of"):
            transport.lookup_customer("acme")
    assert sum(sent) < 64 * MAX_LOOKUP_ANSWER  # (what the socket buffers took, no more)


def test_a_redirect_that_turns_the_post_into_a_get_is_a_clear_error() -> None:
    def handle(method: str, path: str, body: bytes) -> bytes:
        if path.startswith("/topics/"):
            return _http(301, b"", Location="/moved/topics/usage-events")
        return _http(200, b"{}")  # (the GET the redirect made of the POST)

    with _server(handle) as url:
        transport = HTTPTransport(url, internal_url=url, timeout=2)
        with pytest.raises(BackendUnavailable, match=r"redirected \(HTTP 301 to .*/moved/"):
            transport.produce([{"key": "c", "value": {"n": 1}}])


def test_a_307_redirect_keeps_the_post_and_delivers() -> None:
    got: list[str] = []

    def handle(method: str, path: str, body: bytes) -> bytes:
        if path.startswith("/topics/"):
            return _http(307, b"", Location="/new/topics/usage-events")
        got.append(method)
        return _ok_offsets(body)

    with _server(handle) as url:
        result = HTTPTransport(url, internal_url=url, timeout=2).produce(
            [{"key": "c", "value": {"n": 1}}]
        )
    assert result.all_ok and got == ["POST"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_cuts_off_its_own_slow_answers() -> None:
    def handle(method: str, path: str, body: bytes) -> Callable[[socket.socket], None]:
        return _drip(_account(path), every=0.2)

    with _server(handle) as url:
        transport = HTTPTransport(url, internal_url=url, timeout=0.3)
        with pytest.raises(BackendUnavailable, match="cut off"):
            transport.lookup_customer("parent")  # (the watchdog's thread is started)
        pid = os.fork()
        if pid == 0:  # the child: no watchdog thread of its own until it needs one
            code = 1
            try:
                transport.lookup_customer("child")
            except BackendUnavailable as exc:
                code = 0 if "cut off" in str(exc) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
