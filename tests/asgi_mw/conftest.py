"""Fixtures for the ASGI middleware tests: apps run under a real uvicorn server on a
loopback port, metering into meter_core's local backend through a real MeterClient."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from meter_core import MeterClient
from meter_core.devserver import DevServer
from tests.asgi_mw.live import LiveServer

MARKER_TENANT = "marker-tenant"


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveServer]]:
    """``serve(app, **uvicorn_config)`` starts ``app`` under uvicorn; stopped at teardown."""
    servers: list[LiveServer] = []

    def start(app: Any, **config: Any) -> LiveServer:
        server = LiveServer(app, **config).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.server.started and not server.server.should_exit:
            server.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def wait_for_records(backend: DevServer, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The record values once the backend holds at least ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        values = backend.values()
        if len(values) >= count:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} records, backend has {values}")
        time.sleep(0.02)


def settled(backend: DevServer, client: MeterClient) -> list[dict[str, Any]]:
    """Every record the backend holds after the client sent all it had."""
    assert client.flush(10)
    return backend.values()


def marker_then_values(
    backend: DevServer, http: httpx.Client, url: str, already: int = 0
) -> list[dict[str, Any]]:
    """Ask for the marker route (metered for MARKER_TENANT), wait for its record, and
    return every other record: a request made before the marker was metered by then, so
    an empty list proves it was not metered."""
    response = http.post(url, headers={"x-test-user": MARKER_TENANT})
    assert response.status_code == 200
    values = wait_for_records(backend, already + 1)
    time.sleep(0.05)
    values = backend.values()
    assert any(v["tenant_id"] == MARKER_TENANT for v in values)
    return [v for v in values if v["tenant_id"] != MARKER_TENANT]
