"""The client the middleware owns (built from the environment) is flushed and closed at
shutdown: with lifespan events, and at process exit when the server sends none."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from meter_asgi import MeterMiddleware, meter_usage
from meter_core import MeterClient, SQLiteSpool
from meter_core.devserver import DevServer
from tests.asgi_mw import apps
from tests.asgi_mw.conftest import settled
from tests.asgi_mw.live import LiveServer

ROUTES = {"POST /documents/{doc_id}/scan": "page.processed.basic"}


@pytest.fixture
def env_for(monkeypatch: pytest.MonkeyPatch) -> Callable[[DevServer], None]:
    def configure(backend: DevServer) -> None:
        for name in list(os.environ):
            if name.startswith("METER_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("METER_KAFKA_URL", backend.url)
        monkeypatch.setenv("METER_INTERNAL_URL", backend.url)
        monkeypatch.setenv("METER_DEVICE_ID", "env-device")
        # Long enough that only the shutdown flush can deliver within the test.
        monkeypatch.setenv("METER_FLUSH_INTERVAL", "60")

    return configure


def test_owned_client_is_flushed_and_closed_at_lifespan_shutdown(
    serve: Callable[..., LiveServer],
    meter_backend: DevServer,
    http: httpx.Client,
    env_for: Callable[[DevServer], None],
) -> None:
    env_for(meter_backend)
    app = apps.fastapi_app()
    app.add_middleware(MeterMiddleware, routes=ROUTES, tenant="acme")
    server = serve(app, lifespan="on")
    for doc in ("a", "b", "c"):
        assert http.post(f"{server.url}/documents/{doc}/scan").is_success
    time.sleep(0.3)
    assert meter_backend.values() == []  # still queued in the owned client
    server.stop()
    values = meter_backend.values()  # delivered before the server finished stopping
    assert [v["meter_id"] for v in values] == ["page.processed.basic"] * 3
    assert {v["device_id"] for v in values} == {"env-device"}


@pytest.mark.parametrize("lifespan", ["on", "off"])
def test_an_owned_client_built_without_lifespan_startup_is_warned_about(
    serve: Callable[..., LiveServer],
    meter_backend: DevServer,
    http: httpx.Client,
    env_for: Callable[[DevServer], None],
    caplog: pytest.LogCaptureFixture,
    lifespan: str,
) -> None:
    env_for(meter_backend)
    metered = MeterMiddleware(apps.fastapi_app(), routes=ROUTES, tenant="acme")
    with caplog.at_level("WARNING", logger="meter.asgi"):
        server = serve(metered, lifespan=lifespan)
        for doc in ("a", "b"):
            assert http.post(f"{server.url}/documents/{doc}/scan").is_success
        server.stop()
    client = metered.client
    assert client is not None
    client.close(5)  # (without lifespan, nothing else closes it before the backend stops)
    assert len(settled(meter_backend, client)) == 2
    warned = [r for r in caplog.records if "got no lifespan startup" in r.getMessage()]
    assert len(warned) == (1 if lifespan == "off" else 0)


def test_a_given_client_is_flushed_and_left_open_at_shutdown(
    serve: Callable[..., LiveServer],
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    # flush_interval: only the shutdown flush can deliver within the test (uvicorn ends
    # on SIGTERM without running atexit, so what is still queued then would be lost)
    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, device_id="d",
                         flush_interval=60)  # fmt: skip
    app = apps.fastapi_app()
    app.add_middleware(MeterMiddleware, client=client, routes=ROUTES, tenant="acme")
    server = serve(app, lifespan="on")
    assert http.post(f"{server.url}/documents/a/scan").is_success
    time.sleep(0.3)
    assert meter_backend.values() == []  # still queued in the client
    server.stop()
    assert len(meter_backend.values()) == 1  # delivered before the server stopped
    client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    assert len(settled(meter_backend, client)) == 2  # still open: the app closes it
    assert client.failed_events() == []
    client.close()


def test_owned_client_that_cannot_be_built_leaves_the_app_working(
    serve: Callable[..., LiveServer],
    http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in list(os.environ):
        if name.startswith("METER_"):
            monkeypatch.delenv(name)
    middleware = MeterMiddleware(apps.fastapi_app(), routes=ROUTES, tenant="acme")
    with caplog.at_level("ERROR", logger="meter.asgi"):
        server = serve(middleware, lifespan="on")
        for _ in range(2):
            assert http.post(f"{server.url}/documents/a/scan").is_success
    assert middleware.client is None
    errors = [r for r in caplog.records if "metering is off" in r.getMessage()]
    assert len(errors) == 1 and "kafka_url" in errors[0].getMessage()


def test_an_app_served_again_builds_a_new_owned_client_from_the_environment(
    meter_backend: DevServer, http: httpx.Client, env_for: Callable[[DevServer], None]
) -> None:
    # one app object, two servers one after the other (one server or TestClient per
    # test), each with the environment pointing at its own backend
    app = apps.fastapi_app()
    app.add_middleware(MeterMiddleware, routes=ROUTES, tenant="acme")
    env_for(meter_backend)
    with LiveServer(app, lifespan="on") as first:
        assert http.post(f"{first.url}/documents/a/scan").is_success
    assert len(meter_backend.values()) == 1  # flushed at the first shutdown
    second_backend = DevServer().start()
    try:
        env_for(second_backend)
        with LiveServer(app, lifespan="on") as second:
            for doc in ("b", "c"):
                assert http.post(f"{second.url}/documents/{doc}/scan").is_success
        # delivered by a new client at the second shutdown, to the second backend
        values = second_backend.values()
        assert [v["meter_id"] for v in values] == ["page.processed.basic"] * 2
        assert len(meter_backend.values()) == 1
    finally:
        second_backend.stop()


def test_metered_requests_without_a_client_are_counted_as_unconfigured(
    serve: Callable[..., LiveServer], http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("METER_"):
            monkeypatch.delenv(name)
    middleware = MeterMiddleware(apps.fastapi_app(), routes=ROUTES, tenant="acme")
    server = serve(middleware, lifespan="on")
    for doc in ("a", "b"):
        assert http.post(f"{server.url}/documents/{doc}/scan").is_success
    assert http.get(f"{server.url}/documents/a/scan").is_success  # not a metered route
    server.stop()  # waits for the requests' tasks, metering included
    assert middleware.client is None
    assert middleware.stats["unconfigured"] == 2
    assert middleware.stats["metered_requests"] == middleware.stats["events"] == 0


CHILD = """
import sys
import uvicorn
from meter_asgi import MeterMiddleware
from tests.asgi_mw.apps import bare_app

app = MeterMiddleware(bare_app, routes={"POST /scan": "page.processed.basic"}, tenant="acme")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", log_level="warning")
"""


def test_without_lifespan_events_the_owned_client_is_flushed_at_process_exit(
    meter_backend: DevServer, http: httpx.Client, tmp_path: Path
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env.update(
        METER_KAFKA_URL=meter_backend.url,
        METER_INTERNAL_URL=meter_backend.url,
        METER_DEVICE_ID="child",
        METER_FLUSH_INTERVAL="60",
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
    )
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    child = subprocess.Popen([sys.executable, str(script), str(port)], env=env)
    try:
        url = f"http://127.0.0.1:{port}/scan"
        deadline = time.monotonic() + 15
        while True:
            try:
                assert http.post(url).text == "bare"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the child server did not start"
                time.sleep(0.05)
        assert http.post(url).text == "bare"
        time.sleep(0.3)
        assert meter_backend.values() == []
        child.send_signal(signal.SIGINT)
        assert child.wait(15) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    values = meter_backend.values()
    assert [(v["meter_id"], v["device_id"]) for v in values] == [
        ("page.processed.basic", "child")
    ] * 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_request_cancelled_after_its_response_is_still_billed(
    serve: Callable[..., LiveServer],
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    # A background task outlives uvicorn's graceful-shutdown timeout: uvicorn cancels the
    # request's task after the response went out in full. The client got its result.
    async def slow_follow_up() -> None:
        await asyncio.sleep(60)

    app = FastAPI()

    @app.post("/documents/{doc_id}/scan")
    async def scan(doc_id: str, request: Request) -> JSONResponse:
        meter_usage(request).add("page.processed.advanced", 2)
        return JSONResponse({}, background=BackgroundTask(slow_follow_up))

    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, device_id="d",
                         flush_interval=60)  # fmt: skip
    app.add_middleware(MeterMiddleware, client=client, routes=ROUTES, tenant="acme")
    server = serve(app, lifespan="on", timeout_graceful_shutdown=0.5)
    assert http.post(f"{server.url}/documents/a/scan").status_code == 200
    server.stop()
    values = settled(meter_backend, client)
    assert sorted((v["meter_id"], v["total_usage"]) for v in values) == [
        ("page.processed.advanced", 2),
        ("page.processed.basic", 1),
    ]
    client.close()


def test_a_given_client_left_open_with_events_waiting_is_reported_at_shutdown(
    serve: Callable[..., LiveServer],
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    # The app forgot to close its client, and the backend is down: the shutdown flush
    # gives up, and what the process is about to lose is said, with what to do.
    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, device_id="d",
                         spool_path=str(tmp_path / "spool.db"), backoff_base=5,
                         timeout=0.5)  # fmt: skip
    client.send(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    app = apps.fastapi_app()
    app.add_middleware(
        MeterMiddleware, client=client, routes=ROUTES, tenant="acme", close_timeout=0.5
    )
    server = serve(app, lifespan="on")
    meter_backend.set_fault("down")
    for _ in range(3):
        assert http.post(f"{server.url}/documents/a/scan").is_success
    with caplog.at_level("ERROR", logger="meter.asgi"):
        server.stop()
    [line] = [r.getMessage() for r in caplog.records if "at lifespan shutdown" in r.getMessage()]
    assert "3 usage events were still waiting" in line
    assert "await client.aclose()" in line and "failure store" in line
    meter_backend.clear_fault()
    client.close(timeout=0)  # (the app's job, forgotten: the events go to its store)
    spool = client.failure_store
    assert isinstance(spool, SQLiteSpool) and spool.pending_count() == 3


def test_a_given_client_the_app_closed_is_not_reported_at_shutdown(
    serve: Callable[..., LiveServer],
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, device_id="d",
                         timeout=0.5)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose(timeout=0.5)

    app = FastAPI(lifespan=lifespan)

    @app.post("/documents/{doc_id}/scan")
    async def scan(doc_id: str) -> dict[str, str]:
        return {"scanned": doc_id}

    app.add_middleware(MeterMiddleware, client=client, routes=ROUTES, tenant="acme")
    server = serve(app, lifespan="on")
    meter_backend.set_fault("down")
    assert http.post(f"{server.url}/documents/a/scan").is_success
    with caplog.at_level("ERROR", logger="meter.asgi"):
        server.stop()
    assert client.closed
    assert not [r for r in caplog.records if "at lifespan shutdown" in r.getMessage()]
