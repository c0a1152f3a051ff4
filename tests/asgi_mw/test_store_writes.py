"""Store writes on the request path, served by uvicorn: they run in a worker thread, never
on the event loop, a request's events are written whole even when its task is cancelled
right after the response (a timeout middleware, a server stopping), and a write that
fails keeps them until the store works again."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import meter_core.sender as sender_module
from meter_asgi import MeterMiddleware
from meter_core import MeterClient, SQLiteSpool
from meter_core.devserver import DevServer
from tests.asgi_mw.live import LiveServer
from tests.core.test_async_enqueue import WatchedStore
from tests.core.test_sender import GatedTransport, client_with

USAGE_ENTRIES = 300


async def handler_app(scope: Any, receive: Any, send: Any) -> None:
    """Adds ``USAGE_ENTRIES`` entries of usage, answers 200 with its event loop's thread."""
    if scope["type"] != "http":
        return
    usage = scope["state"]["meter"]
    for n in range(1, USAGE_ENTRIES + 1):
        usage.add("page.processed.basic", n)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(threading.get_ident()).encode()})


class CancelAfterResponse:
    """Runs the app in a task and cancels it as soon as the response is complete (what a
    request-timeout middleware does to a request that overruns after answering)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task: asyncio.Task[None] | None = None

        async def watch(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                assert task is not None
                asyncio.get_running_loop().call_soon(task.cancel)

        task = asyncio.ensure_future(self.app(scope, receive, watch))
        await asyncio.gather(task, return_exceptions=True)


def test_a_durable_requests_events_are_stored_whole_when_its_task_is_cancelled(
    serve: Callable[..., LiveServer], http: httpx.Client
) -> None:
    transport, store = GatedTransport(), WatchedStore()  # the backend holds every send
    client = client_with(transport, failure_store=store, durable=True)
    try:
        metered = MeterMiddleware(handler_app, client=client, tenant="acme")
        server = serve(CancelAfterResponse(metered), lifespan="off")
        for _ in range(3):
            assert http.get(f"{server.url}/scan").is_success
        deadline = time.monotonic() + 10  # (written after the response left)
        while len(store.calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        assert [size for _, size in store.calls] == [USAGE_ENTRIES] * 3
        # counted although each wait for its write was cancelled
        assert metered.stats["metered_requests"] == 3
        assert metered.stats["events"] == 3 * USAGE_ENTRIES
    finally:
        transport.gate.set()
        client.close(5)


def test_a_full_queue_spilling_to_the_store_does_not_hold_the_event_loop(
    serve: Callable[..., LiveServer], http: httpx.Client
) -> None:
    transport, store = GatedTransport(), WatchedStore()
    client = client_with(transport, failure_store=store, max_queue=2, batch_size=1)
    try:
        metered = MeterMiddleware(handler_app, client=client, tenant="acme")
        server = serve(metered, lifespan="off")
        loop_threads = {int(http.get(f"{server.url}/scan").text) for _ in range(3)}
        assert store.calls  # the queue filled: events went to the store
        assert not loop_threads & {thread for thread, _ in store.calls}
    finally:
        transport.gate.set()
        client.close(5)


def test_a_durable_write_that_fails_sends_the_requests_events_from_memory(
    serve: Callable[..., LiveServer],
    http: httpx.Client,
    meter_backend: DevServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The spool stays locked past its busy timeout (a backup, another process): the
    # response is already sent, so the events cannot be refused; they are queued in
    # memory and sent as in default mode (before: lost, logged).
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.1)
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, busy_timeout=0.2)
    spool.counts()  # (creates the file)
    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, device_id="web-1",
                         failure_store=spool, durable=True, flush_interval=0.05)  # fmt: skip
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        app = MeterMiddleware(handler_app, client=client, tenant="acme")
        server = serve(app, lifespan="off")
        locker.execute("BEGIN EXCLUSIVE")
        assert http.get(f"{server.url}/scan").is_success
        deadline = time.monotonic() + 10  # delivered while the spool is still locked
        while len(meter_backend.values()) < USAGE_ENTRIES:
            assert time.monotonic() < deadline, client.stats()
            time.sleep(0.05)
        assert sorted(v["total_usage"] for v in meter_backend.values()) == list(
            range(1, USAGE_ENTRIES + 1)
        )
        assert client.flush(5)
        assert client.stats()["failed_in_memory"] == 0 and app.stats["errors"] == 0
        locker.execute("ROLLBACK")
        assert spool.pending_count() == 0
    finally:
        locker.close()
        client.close(5)
        spool.close()
