"""Synchronous sends against the real local backend: lookups, answers, redaction."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)

from meter_core import (
    BackendUnavailable,
    ConfigurationError,
    CustomerNotFound,
    DeliveryRejected,
    InvalidEvent,
    LogThrottle,
    MeterClient,
    RateLimited,
)
from meter_core.devserver import DevServer
from meter_core.transport import HTTPTransport, _describe

KEY = "sk-test-SECRET-KEY-0042"
SEND = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 2}


def test_internal_lookup_mode(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    answer = client.send(**SEND)
    assert answer["offsets"][0]["error_code"] is None
    assert backend.lookups == ["acme"]
    (record,) = backend.records
    assert record["key"] == "cust-acme"
    assert record["value"]["customer_id"] == "cust-acme"
    assert "authorization" not in backend.last_headers  # internal mode sends no key


def test_external_lookup_mode_sends_the_bearer_key_and_tenant_header() -> None:
    with DevServer(api_key=KEY) as backend:
        client = MeterClient(backend.url, backend.url, KEY, device_id="d", timeout=2)
        client.send(**SEND)
        assert backend.lookups == ["acme"]
        wrong = MeterClient(backend.url, backend.url, "wrong-key", device_id="d", timeout=2)
        with pytest.raises(DeliveryRejected, match="HTTP 401"):
            wrong.send(**SEND)
        client.close()
        wrong.close()


def test_a_tenant_starting_or_ending_with_whitespace_fails_for_good_in_portal_mode_only(
    tmp_path: Any,
) -> None:
    # The portal lookup sends the tenant in a header, which cannot start with whitespace:
    # such events fail once, with the reason, rather than being retried for nothing.
    from meter_core import SQLiteSpool

    with DevServer(api_key=KEY) as backend:
        spool = SQLiteSpool(tmp_path / "s.db")
        client = MeterClient(backend.url, backend.url, KEY, device_id="d", timeout=2,
                             failure_store=spool, flush_interval=0.02)  # fmt: skip
        for tenant in (" acme", "acme  "):
            with pytest.raises(DeliveryRejected, match="starts or ends with whitespace") as info:
                client.send(**{**SEND, "tenant_id": tenant})
            assert not info.value.retriable
        event_id = client.record(**{**SEND, "tenant_id": "acme "})
        assert client.flush(5)
        assert client.stats()["retried"] == 0 and client.stats()["failed"] == 1
        (row,) = spool.claim(5)
        assert row.event.event_id == event_id and "x-tenant-id" in row.last_error
        assert backend.lookups == [] and backend.records == []
        # a non-ASCII space goes as UTF-8 bytes, which servers keep as they are
        assert client.send(**{**SEND, "tenant_id": "\u00a0acme"})
        assert backend.lookups == ["\u00a0acme"]
        client.close()
        internal = MeterClient(backend.url, internal_url=backend.url, device_id="d", timeout=2)
        assert internal.send(**{**SEND, "tenant_id": " acme"})  # a path can carry it
        assert backend.lookups[-1] == " acme"
        internal.close()


def test_tenant_is_percent_encoded_in_the_lookup_path(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    tenant = "team a/b?c#d%é"
    client.send(**{**SEND, "tenant_id": tenant})
    assert backend.lookups == [tenant]
    assert backend.values()[0]["customer_id"] == f"cust-{tenant}"


def test_list_shaped_lookup_answers_take_the_first_account() -> None:
    with DevServer(lookup_shape="list", customers={"acme": "C-1"}) as backend:
        client = MeterClient(backend.url, internal_url=backend.url, device_id="d")
        client.send(**SEND)
        assert backend.values()[0]["customer_id"] == "C-1"
        client.close()


def test_one_lookup_for_many_events_of_one_tenant(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    for _ in range(20):
        client.send(**SEND)
    assert backend.lookups == ["acme"]
    assert len(backend.records) == 20


def test_tenant_without_account_is_customer_not_found_and_cached(
    backend: DevServer, make_client: Any
) -> None:
    backend.set_fault("unknown_tenant")
    client = make_client()
    for _ in range(3):
        with pytest.raises(CustomerNotFound):
            client.send(**SEND)
    assert backend.lookups == ["acme"]
    assert backend.records == []


def test_backend_down_is_unavailable(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("down")
    with pytest.raises(BackendUnavailable, match="HTTP 503") as info:
        client.send(**SEND)
    assert info.value.retriable


def test_html_502_is_a_clear_error_not_a_decode_error(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("html502")
    with pytest.raises(BackendUnavailable, match="HTTP 502.*non-JSON body"):
        client.send(**SEND)


def test_rate_limit_carries_retry_after(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("rate_limit", retry_after=7)
    with pytest.raises(RateLimited) as info:
        client.send(**SEND)
    assert info.value.retry_after == 7.0


def test_4xx_is_rejected(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    backend.set_fault("reject", status=422, error_code=42201)
    with pytest.raises(DeliveryRejected) as info:
        client.send(**SEND)
    assert info.value.status == 422
    assert info.value.error_code == 42201
    assert not info.value.retriable


def test_unknown_topic_is_rejected(backend: DevServer, make_client: Any) -> None:
    client = make_client(topic="no-such-topic")
    with pytest.raises(DeliveryRejected) as info:
        client.send(**SEND)
    assert info.value.status == 404


def test_per_record_error_of_a_200_fails_that_record(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    backend.set_fault("record_errors", error_code=50003)
    with pytest.raises(BackendUnavailable, match="record error 50003"):
        client.send(**SEND)
    backend.set_fault("record_errors", error_code=50002)
    with pytest.raises(DeliveryRejected, match="record error 50002"):
        client.send(**SEND)
    assert backend.records == []


def test_malformed_json_reply_is_unavailable(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("malformed")
    with pytest.raises(BackendUnavailable, match="malformed"):
        client.send(**SEND)


def test_slow_backend_times_out(backend: DevServer, make_client: Any) -> None:
    client = make_client(timeout=0.2)
    client.lookup_customer("acme")
    backend.set_fault("slow", delay=1.0, times=1)
    with pytest.raises(BackendUnavailable, match="timed out"):
        client.send(**SEND)


def test_connection_refused_is_unavailable(closed_port_url: str) -> None:
    client = MeterClient(closed_port_url, internal_url=closed_port_url, device_id="d", timeout=1)
    with pytest.raises(BackendUnavailable, match="connection refused"):
        client.send(**SEND)
    client.close()


def test_session_events_are_sent_as_ai_events(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.send_session(
        tenant_id="acme", meter_id="chat.on.time_hours", start_time=1_700_000_000_000
    )
    value = backend.values()[0]
    assert value["ai_event"] is True
    assert value["start_time"] == 1_700_000_000_000
    assert "total_usage" not in value


def test_produce_uses_the_rest_proxy_content_type(backend: DevServer, make_client: Any) -> None:
    make_client().send(**SEND)
    assert backend.last_headers["content-type"] == "application/vnd.kafka.json.v2+json"


def test_one_pooled_connection_is_reused(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    session = client.transport.session
    for _ in range(5):
        client.send(**SEND)
    assert client.transport.session is session
    pools = session.get_adapter(backend.url).poolmanager.pools
    assert len(pools) == 1


def test_the_api_key_never_reaches_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with DevServer(api_key="other") as backend:
        client = MeterClient(backend.url, backend.url, KEY, device_id="d", timeout=1)
        with pytest.raises(DeliveryRejected) as info:
            client.send(**SEND)
        client.record(**SEND)
        client.flush(2)
        client.close(1)
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value.__context__)
    assert KEY not in caplog.text
    assert KEY not in repr(client)


def test_credentials_in_urls_are_redacted_in_logs(
    closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = closed_port_url.replace("http://", "http://admin:hunter2@")
    client = MeterClient(url, internal_url=url, device_id="d", timeout=1, max_retries=0)
    client.record(**SEND)
    client.flush(5)
    client.close(1)
    assert "hunter2" not in caplog.text
    assert "not delivered" in caplog.text


class _EchoingPortal(http.server.BaseHTTPRequestHandler):
    """A portal that quotes the Authorization header it got in its 401 answer: in a
    JSON message, or (path ``/cut/...``) where an error message cuts the answer short:
    after 200 characters of a JSON message, after 120 of an HTML page."""

    def do_GET(self) -> None:
        quoted = self.headers["Authorization"]
        content_type = "application/json"
        if "/json-cut/" in self.path:
            body = json.dumps({"message": "x" * 185 + quoted})
        elif "/html-cut/" in self.path:
            body, content_type = "<html>" + "x" * 100 + quoted + "</html>", "text/html"
        else:
            body = json.dumps({"message": f"invalid token {quoted}"})
        self.send_response(401)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _echoing_portal() -> Iterator[str]:
    """An :class:`_EchoingPortal` on a loopback port, for the ``with`` block: its URL."""
    portal = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoingPortal)
    threading.Thread(target=portal.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{portal.server_address[1]}"
    finally:
        portal.shutdown()
        portal.server_close()


def test_a_portal_quoting_the_key_in_its_answer_does_not_put_it_in_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with _echoing_portal() as url:
        client = MeterClient(url, url, KEY, device_id="d", timeout=2, max_retries=0)
        with pytest.raises(DeliveryRejected) as info:
            client.send(**SEND)
        client.record(**SEND)
        client.flush(3)
        stats = client.stats()
        client.close(1)
    assert "invalid token Bearer ***" in str(info.value)  # the answer, without the key
    assert KEY not in str(info.value)
    assert KEY not in caplog.text
    assert "invalid token" in caplog.text
    assert KEY not in str(stats)


def test_a_tenant_id_cannot_be_a_path_step_of_the_lookup_url(backend: DevServer) -> None:
    client = MeterClient(backend.url, internal_url=backend.url, device_id="d")
    for tenant in (".", ".."):
        with pytest.raises(InvalidEvent, match="tenant_id"):
            client.record(**{**SEND, "tenant_id": tenant})
    client.send(**{**SEND, "tenant_id": "..a"})  # dots within an id are ids like others
    assert backend.lookups == ["..a"]
    client.close()


# -- HTTPTransport checks its arguments when it is built --------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kafka_url": None}, "kafka_url: is required"),
        ({"kafka_url": "kafka:8082"}, "kafka_url: URL must start with http"),
        ({"kafka_url": "ftp://kafka"}, "kafka_url: URL must start with http"),
        ({"portal_url": "not a url"}, "portal_url: URL must start with http"),
        ({"portal_url": 5}, "portal_url: a URL is required, got int"),
        ({"internal_url": None}, "internal_url: must not be None"),
        ({"internal_url": "http://"}, "internal_url: URL has no host"),
        ({"timeout": 0}, "timeout: must be >= 0.001"),
        ({"timeout": -1.0}, "timeout: must be >= 0.001"),
        ({"timeout": float("nan")}, "timeout: must be finite"),
        ({"timeout": "10"}, "timeout: must be a number"),
        ({"timeout": True}, "timeout: must be a number"),
        ({"pool_maxsize": 0}, "pool_maxsize: must be an int >= 1, got 0"),
        ({"pool_maxsize": 2.5}, "pool_maxsize: must be an int >= 1, got 2.5"),
        ({"pool_maxsize": None}, "pool_maxsize: must be an int >= 1, got None"),
        ({"pool_maxsize": True}, "pool_maxsize: must be an int >= 1, got True"),
        ({"topic": ""}, "topic: must be a non-empty str"),
        ({"topic": None}, "topic: must not be None"),
        ({"api_key": 42}, "api_key: must be a str, got int"),
    ],
)
def test_http_transport_refuses_bad_arguments_when_built(
    options: dict[str, Any], message: str
) -> None:
    kwargs: dict[str, Any] = {"kafka_url": "http://kafka:8082", **options}
    with pytest.raises(ConfigurationError, match=message):
        HTTPTransport(**kwargs)


def test_http_transport_never_shows_a_key_given_in_the_wrong_place() -> None:
    with pytest.raises(ConfigurationError) as url_error:
        HTTPTransport("http://kafka:8082", portal_url=KEY)  # the key where the URL goes
    with pytest.raises(ConfigurationError) as key_error:
        HTTPTransport("http://kafka:8082", "http://portal", KEY + "\n")  # from a file
    for caught in (url_error, key_error):
        assert KEY not in str(caught.value)
    assert str(key_error.value).startswith("api_key: must not contain whitespace")


def test_http_transport_wraps_a_plain_str_api_key_in_a_secret() -> None:
    with DevServer(api_key=KEY) as portal:
        transport = HTTPTransport(portal.url, portal.url, KEY, timeout=2)
        try:
            assert transport.external_lookup
            assert KEY not in repr(transport) and KEY not in repr(vars(transport))
            assert transport.lookup_customer("acme") == "cust-acme"  # was AttributeError
        finally:
            transport.close()
        # an empty key is no key: internal lookup, as for the client
        assert not HTTPTransport(portal.url, portal.url, "").external_lookup


def test_describe_says_timed_out_for_a_timeout_after_urllib3_retries() -> None:
    def after_retries(reason: Exception) -> requests.ConnectionError:
        return requests.ConnectionError(MaxRetryError(None, "/x", reason=reason))  # type: ignore[arg-type]

    read = ReadTimeoutError(None, "/x", "Read timed out. (read timeout=0.2)")  # type: ignore[arg-type]
    assert _describe(after_retries(read)) == "timed out"
    assert _describe(after_retries(ConnectTimeoutError("connect timeout=0.2"))) == "timed out"
    os_timeout = requests.ConnectionError("wrapped")
    os_timeout.__cause__ = TimeoutError(110, "Connection timed out")
    assert _describe(os_timeout) == "timed out"
    # a refused connection is a NewConnectionError, a ConnectTimeoutError subclass in
    # urllib3: it still reads as refused, not as a timeout
    refused = NewConnectionError(None, "Failed to establish a new connection")  # type: ignore[arg-type]
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert _describe(after_retries(refused)) == "connection refused"


def test_a_lookup_that_times_out_on_every_try_says_timed_out(backend: DevServer) -> None:
    transport = HTTPTransport(backend.url, internal_url=backend.url, timeout=0.2)
    backend.set_fault("slow", delay=1.0, times=3)  # the first try and urllib3's 2 retries
    try:
        with pytest.raises(BackendUnavailable, match="failed: timed out$"):
            transport.lookup_customer("acme")
    finally:
        transport.close()


@pytest.mark.parametrize("cut", ["json-cut", "html-cut"])
def test_a_key_quoted_where_an_error_message_cuts_the_answer_short_shows_no_part_of_it(
    cut: str,
) -> None:
    with _echoing_portal() as portal_url:
        url = f"{portal_url}/{cut}"
        client = MeterClient(url, url, KEY, device_id="d", timeout=2, max_retries=0)
        with pytest.raises(DeliveryRejected) as info:
            client.send(**SEND)
        client.close(1)
    assert KEY[:6] not in str(info.value)


def test_a_key_that_is_part_of_a_customer_id_leaves_the_id_as_the_portal_gave_it() -> None:
    # (only error answers are scrubbed of the key: a 2xx is read as it is)
    with DevServer(api_key="cust") as backend:
        client = MeterClient(backend.url, backend.url, "cust", device_id="d", timeout=2)
        client.send(**SEND)
        assert backend.values()[0]["customer_id"] == "cust-acme"
        client.close()


@pytest.mark.parametrize("quoted", ["html", "go-json"])
def test_a_key_quoted_in_an_escaped_form_is_scrubbed_too(quoted: str) -> None:
    from meter_core.transport import _scrub_body

    key = "k<y&" + KEY
    body = (
        f"<p>{key.replace('&', '&amp;').replace('<', '&lt;')}</p>"
        if quoted == "html"
        else '{"m": "' + key.replace("<", "\\u003c").replace("&", "\\u0026") + '"}'
    )
    assert KEY not in _scrub_body(body.encode(), key).decode()


def test_urllib3_retry_lines_of_the_client_are_throttled_and_the_apps_left_alone(
    closed_port_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An outage: each failed call is retried twice by urllib3, which logs a WARNING each
    # time on its own logger. The client's come out as one line per 10 s on
    # meter.transport; the app's own urllib3 pools still log theirs.
    import urllib3

    from meter_core import http_retries

    # (the throttle is the process's: another test may have logged its line just now)
    monkeypatch.setattr(
        http_retries._FILTER, "_throttle", LogThrottle(http_retries.logger, interval=10.0)
    )
    client = MeterClient(closed_port_url, internal_url=closed_port_url, device_id="d", timeout=1)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            with pytest.raises(BackendUnavailable):
                client.send(**SEND)
        ours = [r for r in caplog.records if r.name == "urllib3.connectionpool"]
        throttled = [r for r in caplog.records if "retried at once by urllib3" in r.getMessage()]
        assert ours == [] and len(throttled) == 1
        assert throttled[0].name == "meter.transport"
        caplog.clear()
        pool = urllib3.PoolManager(retries=urllib3.Retry(connect=1))
        with pytest.raises(urllib3.exceptions.MaxRetryError):
            pool.request("GET", closed_port_url)
    assert any(
        r.name == "urllib3.connectionpool" and "Retrying" in r.getMessage() for r in caplog.records
    )
    client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_no_thread_of_a_forked_child_gets_the_parents_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lookups run several at a time: in a child, each thread's first call asks for the
    # session at once, and none may get the parent's (its sockets are the parent's).
    transport = HTTPTransport("http://127.0.0.1:9", internal_url="http://127.0.0.1:9")
    parent_session = transport.session  # (kept alive: no new session takes its address)
    parents = id(parent_session)
    build = HTTPTransport._new_session

    def slow_build(self: HTTPTransport) -> Any:
        time.sleep(0.05)  # (widens the window between two threads' first calls)
        return build(self)

    monkeypatch.setattr(HTTPTransport, "_new_session", slow_build)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_end)
            seen: list[int] = []
            threads = [
                threading.Thread(target=lambda: seen.append(id(transport.session)))
                for _ in range(5)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            os.write(write_end, " ".join(map(str, seen)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        seen = [int(n) for n in pipe.read().split()]
    transport.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(seen) == 5 and parents not in seen
