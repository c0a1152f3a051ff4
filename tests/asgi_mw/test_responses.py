"""What counts as a billed response: only a complete one; usage headers set twice; header
lists of any iterable; the app's own ``request.state.meter``. Served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from meter_asgi import MeterMiddleware, meter_usage
from meter_core import ConfigurationError, MeterClient, RequestUsage
from meter_core.devserver import DevServer
from tests.asgi_mw.conftest import settled, wait_for_records
from tests.asgi_mw.live import LiveServer

OK_START = {"type": "http.response.start", "status": 200, "headers": []}


async def _drain(receive: Any) -> None:
    while (await receive()).get("more_body"):
        pass


async def responses_app(scope: Any, receive: Any, send: Any) -> None:
    """/cut: streams one chunk, then stops when the client leaves (the end of the body is
    never sent); /slow: a plain 200 after 0.5 s of work; /twice?pages=a,b: the usage
    header once per value; /gen: its headers given as a generator (with a usage header of
    5 when there is a query); anything else: a plain 200."""
    if scope["type"] != "http":
        return
    await _drain(receive)
    path = scope["path"]
    if path in ("/cut", "/cut-ended", "/cut-sized"):
        sized = [(b"content-length", b"100")] if path == "/cut-sized" else []
        await send({**OK_START, "headers": sized})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        if path != "/cut":  # as BaseHTTPMiddleware does once the app inside stopped
            await send({"type": "http.response.body", "body": b""})
        return
    if path in ("/empty", "/headers-only"):  # a 204, or a HEAD: whole once its headers went
        await send({**OK_START, "status": 204 if path == "/empty" else 200})
        await asyncio.sleep(0.3)  # (before the last message: a middleware, a cleanup)
        await send({"type": "http.response.body", "body": b""})
        return
    if path in ("/slow", "/slow-task"):
        await asyncio.sleep(0.5)
    if path == "/slow-task":  # no rule: only a background task adds usage, once answered
        await send(OK_START)
        await send({"type": "http.response.body", "body": b"ok"})
        scope["state"]["meter.usage"].add("report.generated.medium", 1)
        return
    if path == "/twice":
        values = unquote(scope["query_string"].decode().split("=", 1)[1]).split(",")
        headers = [(b"x-meter-pages", value.encode()) for value in values]
        await send({**OK_START, "headers": headers})
    elif path == "/gen":
        pairs = [(b"x-kept", b"yes")]
        if scope["query_string"]:
            pairs.append((b"x-meter-pages", b"5"))
        await send({**OK_START, "headers": (pair for pair in pairs)})
    else:
        await send(OK_START)
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def metered(meter_client: MeterClient) -> MeterMiddleware:
    pages = {"meter": "page.processed.advanced", "header": "x-meter-pages"}
    return MeterMiddleware(
        responses_app, client=meter_client, tenant="acme",
        routes={"GET /cut": "report.generated.large", "GET /cut-ended": "report.generated.large",
                "GET /cut-sized": "report.generated.large", "POST /empty": "page.processed.basic",
                "HEAD /headers-only": "report.generated.medium",
                "GET /twice": pages, "GET /gen": pages,
                "GET /marker": "template.licensed.total", "GET /slow": "report.generated.small"},
    )  # fmt: skip


@pytest.fixture
def server(serve: Callable[..., LiveServer], metered: MeterMiddleware) -> LiveServer:
    return serve(metered, lifespan="off")


@pytest.mark.parametrize("path", ["/cut", "/cut-ended", "/cut-sized"])
def test_a_stream_cut_short_by_the_client_is_not_billed(
    server: LiveServer,
    metered: MeterMiddleware,
    meter_backend: DevServer,
    http: httpx.Client,
    path: str,
) -> None:
    # /cut-ended, /cut-sized: the end of the stream is sent once the client has left (a
    # BaseHTTPMiddleware inside this one does so): the client never got it (chunked: no
    # end; with a Content-Length: fewer bytes)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while b"first" not in received:  # the stream started; then the client leaves
            chunk = raw.recv(1000)
            assert chunk, f"the stream ended early: {received!r}"
            received += chunk
    time.sleep(0.3)  # the app sees the disconnect and returns
    assert http.get(f"{server.url}/marker").is_success
    (value,) = wait_for_records(meter_backend, 1)
    time.sleep(0.1)
    assert [v["meter_id"] for v in meter_backend.values()] == [value["meter_id"]]
    assert value["meter_id"] == "template.licensed.total"
    assert metered.stats["metered_requests"] == 1


def test_a_client_that_left_before_the_response_is_not_billed(
    server: LiveServer, metered: MeterMiddleware, meter_backend: DevServer, http: httpx.Client
) -> None:
    # The caller gave up (a client timeout) while the app worked: uvicorn takes the 200
    # sent to the closed connection without an error, and nobody got it.
    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{server.url}/slow", timeout=0.2)
    time.sleep(0.6)  # the app answers, to nobody
    assert http.get(f"{server.url}/slow").is_success  # a caller who waited: billed
    wait_for_records(meter_backend, 1)
    time.sleep(0.1)
    assert [v["meter_id"] for v in meter_backend.values()] == ["report.generated.small"]
    assert metered.stats["client_gone"] == 1 and metered.stats["metered_requests"] == 1


def test_usage_a_background_task_adds_after_the_caller_left_is_not_billed(
    server: LiveServer, metered: MeterMiddleware, meter_backend: DevServer, http: httpx.Client
) -> None:
    # No rule for the route, no usage when the response starts: only the task adds some.
    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{server.url}/slow-task", timeout=0.2)
    time.sleep(0.6)  # the app answers, to nobody, and its task adds usage
    assert http.get(f"{server.url}/slow-task").is_success  # a caller who waited: billed
    wait_for_records(meter_backend, 1)
    time.sleep(0.1)
    assert [v["meter_id"] for v in meter_backend.values()] == ["report.generated.medium"]
    assert metered.stats["client_gone"] == 1 and metered.stats["metered_requests"] == 1


def test_a_usage_header_set_twice_with_different_values_drops_that_meter(
    server: LiveServer,
    metered: MeterMiddleware,
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="meter.asgi"):
        first = http.get(f"{server.url}/twice", params={"pages": "3,4"})
        second = http.get(f"{server.url}/twice", params={"pages": "6,6"})
    assert "x-meter-pages" not in first.headers and "x-meter-pages" not in second.headers
    # (events are recorded once the app is done, which may be after the client has its
    # response: wait for the one expected before flushing)
    wait_for_records(meter_backend, 1)
    values = settled(meter_backend, meter_client)
    # neither 3 nor 4 is billed; the same value twice is that value
    assert [(v["meter_id"], v["total_usage"]) for v in values] == [("page.processed.advanced", 6)]
    assert metered.stats["invalid"] == 1
    assert "'3, 4'" in caplog.text


def test_response_headers_given_as_a_generator_are_read_and_passed_on(
    server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.get(f"{server.url}/gen").headers["x-kept"] == "yes"  # no usage header
    response = http.get(f"{server.url}/gen", params={"pages": "5"})
    assert response.headers["x-kept"] == "yes"
    assert "x-meter-pages" not in response.headers
    (value,) = wait_for_records(meter_backend, 1)
    assert (value["meter_id"], value["total_usage"]) == ("page.processed.advanced", 5)


def test_the_apps_own_state_named_meter_is_left_alone(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"meter": "the app's own meter client"}

    app = FastAPI(lifespan=lifespan)

    @app.post("/scan")
    async def scan(request: Request, usage: RequestUsage = Depends(meter_usage)) -> str:  # noqa: B008
        usage.add("page.processed.basic", 2)
        return str(request.state.meter)

    app.add_middleware(MeterMiddleware, client=meter_client, tenant="acme")
    server = serve(app)
    with caplog.at_level("WARNING", logger="meter.asgi"):
        for _ in range(2):
            assert http.post(f"{server.url}/scan").json() == "the app's own meter client"
    values = wait_for_records(meter_backend, 2)
    assert [(v["meter_id"], v["total_usage"]) for v in values] == [("page.processed.basic", 2)] * 2
    warnings = [r for r in caplog.records if "request.state.meter holds" in r.getMessage()]
    assert len(warnings) == 1  # once, not per request


def test_meter_usage_on_a_websocket_says_it_is_for_http_requests() -> None:
    from starlette.requests import HTTPConnection

    connection = HTTPConnection({"type": "websocket", "path": "/ws", "headers": [],
                                 "state": {}})  # fmt: skip
    with pytest.raises(ConfigurationError, match="only for HTTP requests.*session rule"):
        meter_usage(connection)


async def late_end_app(scope: Any, receive: Any, send: Any) -> None:
    """The whole body (its Content-Length), then some work, then the empty last message."""
    if scope["type"] != "http":
        return
    await _drain(receive)
    await send({**OK_START, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok", "more_body": True})
    await asyncio.sleep(0.3)  # (closing a cursor, say)
    await send({"type": "http.response.body", "body": b""})


def test_a_caller_that_hangs_up_once_it_has_the_whole_body_is_billed(
    serve: Callable[..., LiveServer], meter_client: MeterClient, meter_backend: DevServer
) -> None:
    metered = MeterMiddleware(late_end_app, client=meter_client, tenant="acme",
                              routes={"GET /late": "report.generated.small"})  # fmt: skip
    server = serve(metered, lifespan="off")
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while not received.endswith(b"\r\n\r\nok"):
            chunk = raw.recv(1000)
            assert chunk, received
            received += chunk
    # it has what it was promised and leaves before the app's last message
    (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "report.generated.small"
    assert metered.stats["client_gone"] == 0


def test_a_stream_cut_short_under_a_base_http_middleware_is_not_billed(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    # BaseHTTPMiddleware (inside MeterMiddleware) ends its own stream once the app's
    # is cancelled by the client's leaving: the end of the response went to nobody.
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import StreamingResponse

    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"chunk\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(chunks())

    @app.get("/marker")
    async def marker() -> str:
        return "ok"

    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    app.add_middleware(MeterMiddleware, client=meter_client, tenant="acme",
                       routes={"GET /stream": "report.generated.large",
                               "GET /marker": "template.licensed.total"})  # fmt: skip
    server = serve(app)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"chunk" not in received:  # the stream started; then the client leaves
                chunk = raw.recv(1000)
                assert chunk, received
                received += chunk
    time.sleep(0.5)  # the app sees the disconnect and stops
    assert http.get(f"{server.url}/marker").is_success
    wait_for_records(meter_backend, 1)
    time.sleep(0.2)
    assert [v["meter_id"] for v in meter_backend.values()] == ["template.licensed.total"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/empty"), ("HEAD", "/headers-only")])
def test_a_response_without_a_body_is_billed_when_its_caller_leaves_after_the_headers(
    server: LiveServer, metered: MeterMiddleware, meter_backend: DevServer, method: str, path: str
) -> None:
    # A 204, or the answer to a HEAD, is whole once its headers are out: a caller may hang
    # up then, before the app's last (empty) message
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = raw.recv(1000)
            assert chunk, received
            received += chunk
    (value,) = wait_for_records(meter_backend, 1)
    expected = {"/empty": "page.processed.basic", "/headers-only": "report.generated.medium"}
    assert value["meter_id"] == expected[path]
    assert metered.stats["client_gone"] == 0
