"""Fixtures for meter_core tests: the real local backend on a loopback port."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meter_core import MeterClient, SQLiteSpool
from meter_core.devserver import DevServer


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[SQLiteSpool]:
    store = SQLiteSpool(tmp_path / "spool.db")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_client(backend: DevServer) -> Iterator[Any]:
    """Builds clients of ``backend`` with fast test timings; closes them afterwards."""
    clients: list[MeterClient] = []

    def make(**options: Any) -> MeterClient:
        url = options.pop("url", backend.url)
        options.setdefault("internal_url", url)
        options.setdefault("device_id", "test-device")
        options.setdefault("flush_interval", 0.02)
        options.setdefault("timeout", 2.0)
        options.setdefault("backoff_base", 0.02)
        options.setdefault("backoff_cap", 0.1)
        client = MeterClient(url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close(timeout=2)


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` is true (the sender works on threads of its own)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
