"""AI session meters on websocket routes: a start event on accept, an end event when
the connection ends however it ends, with one session id shared by both."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from meter_asgi import MeterMiddleware
from meter_core import MeterClient
from meter_core.devserver import DevServer
from tests.asgi_mw import apps
from tests.asgi_mw.conftest import wait_for_records
from tests.asgi_mw.live import LiveServer

USER = {"x-test-user": "acme"}


@pytest.fixture
def server(
    serve: Callable[..., LiveServer], meter_client: MeterClient
) -> tuple[LiveServer, MeterMiddleware]:
    middleware = MeterMiddleware(
        apps.starlette_app(), client=meter_client, routes=apps.STARLETTE_ROUTES
    )
    return serve(apps.FakeAuth(middleware)), middleware


def assert_one_session(values: list[dict[str, Any]]) -> None:
    start, end = values
    assert start["ai_event"] is True and end["ai_event"] is True
    assert start["meter_id"] == end["meter_id"] == "chat.on.time_hours"
    assert start["tenant_id"] == end["tenant_id"] == "acme"
    assert "start_time" in start and "end_time" not in start
    assert "end_time" in end and "start_time" not in end
    assert end["end_time"] >= start["start_time"]
    assert start["metadata"]["session_id"] == end["metadata"]["session_id"]
    assert start["event_id"] != end["event_id"]


def test_clean_close_sends_start_then_end_with_a_shared_session_id(
    server: tuple[LiveServer, MeterMiddleware], meter_backend: DevServer
) -> None:
    live, middleware = server
    with connect(f"{live.ws_url}/ws/chat", additional_headers=USER) as ws:
        ws.send("hello")
        assert ws.recv() == "echo hello"
        (start,) = wait_for_records(meter_backend, 1)  # sent while the session is open
        assert "start_time" in start
    assert_one_session(wait_for_records(meter_backend, 2))
    assert middleware.stats["sessions_started"] == middleware.stats["sessions_ended"] == 1


def test_server_side_close_ends_the_session(
    server: tuple[LiveServer, MeterMiddleware], meter_backend: DevServer
) -> None:
    live, _ = server
    with connect(f"{live.ws_url}/ws/chat", additional_headers=USER) as ws:
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv()
    assert_one_session(wait_for_records(meter_backend, 2))


def test_abrupt_client_disconnect_ends_the_session(
    server: tuple[LiveServer, MeterMiddleware], meter_backend: DevServer
) -> None:
    live, _ = server
    with connect(f"{live.ws_url}/ws/chat", additional_headers=USER) as ws:
        ws.send("hello")
        assert ws.recv() == "echo hello"
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the TCP connection just ends
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert_one_session(wait_for_records(meter_backend, 2))


def test_an_exception_in_the_app_ends_the_session(
    server: tuple[LiveServer, MeterMiddleware], meter_backend: DevServer
) -> None:
    live, _ = server
    with connect(f"{live.ws_url}/ws/chat", additional_headers=USER) as ws:
        ws.send("crash")
        with pytest.raises(ConnectionClosed):
            ws.recv()
    assert_one_session(wait_for_records(meter_backend, 2))


def test_a_refused_connection_is_no_session(
    server: tuple[LiveServer, MeterMiddleware], meter_backend: DevServer, meter_client: MeterClient
) -> None:
    live, middleware = server
    with (
        pytest.raises(InvalidStatus),
        connect(f"{live.ws_url}/ws/refuse", additional_headers=USER),
    ):
        pass  # pragma: no cover
    with connect(f"{live.ws_url}/ws/chat", additional_headers=USER) as ws:
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv()
    assert_one_session(wait_for_records(meter_backend, 2))
    time.sleep(0.1)
    assert meter_client.flush(5) and len(meter_backend.values()) == 2
    assert middleware.stats["sessions_started"] == 1


def test_a_session_without_tenant_is_not_metered_and_counted(
    server: tuple[LiveServer, MeterMiddleware], meter_backend: DevServer, meter_client: MeterClient
) -> None:
    live, middleware = server
    with connect(f"{live.ws_url}/ws/chat") as ws:  # no user
        ws.send("hello")
        assert ws.recv() == "echo hello"
    deadline = time.monotonic() + 5
    while middleware.stats["untenanted"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert middleware.stats["untenanted"] == 1
    assert meter_client.flush(5) and meter_backend.values() == []
    assert middleware.stats["sessions_started"] == 0


def test_a_session_without_a_client_is_not_metered_and_counted(
    serve: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("METER_"):
            monkeypatch.delenv(name)  # the owned client cannot be built
    middleware = MeterMiddleware(
        apps.starlette_app(), routes=apps.STARLETTE_ROUTES, tenant="acme", device="web-1"
    )
    live = serve(middleware)
    with connect(f"{live.ws_url}/ws/chat") as ws:
        ws.send("hello")
        assert ws.recv() == "echo hello"  # the session was looked at when it was accepted
    assert middleware.client is None
    assert middleware.stats["unconfigured"] == 1
    assert middleware.stats["sessions_started"] == middleware.stats["events"] == 0


# -- the end time is when the connection ended, not when the handler returned ----------

WORK = 1.5  # seconds each session_timing_app handler works after its connection ended


@pytest.fixture
def timing_server(serve: Callable[..., LiveServer], meter_client: MeterClient) -> LiveServer:
    middleware = MeterMiddleware(
        apps.session_timing_app(WORK), client=meter_client, routes=apps.session_timing_routes()
    )
    return serve(apps.FakeAuth(middleware))


def billed_seconds_once_recorded(backend: DevServer, ended: float) -> float:
    """The billed duration of the one session, whose end event is recorded when the
    handler returns (``WORK`` after the connection ended at ``ended``, monotonic)."""
    values = wait_for_records(backend, 2, timeout=WORK + 10)
    assert time.monotonic() - ended >= WORK / 2  # not recorded before the handler returned
    assert_one_session(values)
    start, end = values
    return (end["end_time"] - start["start_time"]) / 1000


def test_the_session_ends_when_the_app_closes_not_when_its_handler_returns(
    timing_server: LiveServer, meter_backend: DevServer
) -> None:
    with connect(f"{timing_server.ws_url}/ws/close-then-work", additional_headers=USER) as ws:
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv()
    ended = time.monotonic()
    assert billed_seconds_once_recorded(meter_backend, ended) < WORK / 2


def test_the_session_ends_at_the_first_failed_send_after_the_client_left(
    timing_server: LiveServer, meter_backend: DevServer
) -> None:
    with connect(f"{timing_server.ws_url}/ws/push-then-work", additional_headers=USER) as ws:
        assert ws.recv() == "ready"
    ended = time.monotonic()  # the handler learns it at its next tick (0.2 s), then works
    assert billed_seconds_once_recorded(meter_backend, ended) < WORK / 2


def test_the_session_ends_when_the_app_receives_the_disconnect(
    timing_server: LiveServer, meter_backend: DevServer
) -> None:
    with connect(f"{timing_server.ws_url}/ws/listen-then-work", additional_headers=USER) as ws:
        ws.send("hello")
    ended = time.monotonic()
    assert billed_seconds_once_recorded(meter_backend, ended) < WORK / 2


def _busy_chat_app(client: MeterClient, *, nested: bool = False) -> Any:
    """A chat whose handler is busy until the server cancels it, then cleans up with an
    await (saving a transcript); the app closes its client in its lifespan, as the
    FastAPI quickstart does."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.routing import Mount, WebSocketRoute
    from starlette.websockets import WebSocket

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.3)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        await client.aclose()

    rules = {"WEBSOCKET /ws/busy": {"meter": "chat.on.time_hours", "session": True}}
    inner: Any = Starlette(routes=[WebSocketRoute("/ws/busy", chat)])
    if nested:  # the same rules on a mounted app too
        inner = MeterMiddleware(inner, client=client, routes=rules, tenant="acme")
        rules = {"WEBSOCKET /ws/busy": {"meter": "chat.on.time_hours", "session": True}}
    app = Starlette(routes=[Mount("/", inner)], lifespan=lifespan)
    return MeterMiddleware(app, client=client, routes=rules, tenant="acme"), inner


def test_sessions_the_server_cancels_at_shutdown_are_ended_before_the_app_closes_its_client(
    serve: Callable[..., LiveServer], meter_backend: DevServer
) -> None:
    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, device_id="d")
    middleware, _ = _busy_chat_app(client)
    live = serve(middleware, lifespan="on", timeout_graceful_shutdown=0.3)
    with contextlib.ExitStack() as sockets:
        for _ in range(3):
            sockets.enter_context(connect(f"{live.ws_url}/ws/busy"))
        wait_for_records(meter_backend, 3)  # three sessions started
        live.stop()  # graceful timeout: the busy handlers are cancelled, then lifespan
    values = meter_backend.values()  # (the app's lifespan closed the client: all sent)
    starts = {v["metadata"]["session_id"] for v in values if "start_time" in v}
    ends = [v["metadata"]["session_id"] for v in values if "end_time" in v]
    assert len(starts) == 3 and sorted(ends) == sorted(starts)  # each ended once
    assert middleware.stats["sessions_ended"] == 3


def test_a_session_metered_by_two_nested_middlewares_is_counted_and_logged(
    serve: Callable[..., LiveServer], meter_backend: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, device_id="d")
    middleware, inner = _busy_chat_app(client, nested=True)
    live = serve(middleware, lifespan="on", timeout_graceful_shutdown=0.3)
    with connect(f"{live.ws_url}/ws/busy"):
        wait_for_records(meter_backend, 2)
    # (the inner one opens its session last: it sees the outer one's)
    assert (inner.stats["metered_twice"], middleware.stats["metered_twice"]) == (1, 0)
    with connect(f"{live.ws_url}/ws/busy"):  # the next connection: counted again, once
        wait_for_records(meter_backend, 4)  # (two starts each; the busy handlers end later)
    assert inner.stats["metered_twice"] == 2
    live.stop()
    assert "websocket session /ws/busy was metered by two MeterMiddleware" in caplog.text
