"""Fixtures of the meter_django tests: the real local backend, METER settings on it,
and a skip of every test when PostgreSQL is asked for but not reachable."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection

from meter_core.devserver import DevServer
from meter_django.client import reset_client

ON_POSTGRES = os.environ.get("METER_TEST_DB") == "postgres"
PG_HOST = os.environ.get("METER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("METER_TEST_PG_PORT", "5432"))


def _postgres_answers() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _user_model_with_tenant_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default ``TENANT`` reads ``request.user.tenant_id``: the test project's user
    model (auth.User) is given that attribute, as the projects that default is for have,
    so the system checks (W004) only speak of it in the tests about it."""
    from django.contrib.auth.models import User

    monkeypatch.setattr(User, "tenant_id", None, raising=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ON_POSTGRES or _postgres_answers():
        return
    skip = pytest.mark.skip(
        reason=f"METER_TEST_DB=postgres but no PostgreSQL answers at {PG_HOST}:{PG_PORT}"
    )
    for item in items:
        if "django_app" in item.nodeid:
            item.add_marker(skip)


postgres_only = pytest.mark.skipif(
    not ON_POSTGRES, reason="needs PostgreSQL row locks (run with METER_TEST_DB=postgres)"
)


@pytest.fixture(autouse=True)
def _fresh_client() -> Iterator[None]:
    """Every test starts and ends without a client (and its sender thread)."""
    reset_client()
    yield
    reset_client(timeout=2.0)


MeterSettings = Callable[..., dict[str, Any]]


@pytest.fixture
def meter_settings(settings: Any, backend: DevServer) -> MeterSettings:
    """Point METER at the local backend with fast test timings; keyword arguments
    (METER keys) override. Returns the dict set."""

    def apply(**overrides: Any) -> dict[str, Any]:
        value: dict[str, Any] = {
            "KAFKA_URL": backend.url,
            "INTERNAL_URL": backend.url,
            "DEVICE_ID": "tests",
            "ENABLED": True,
            "FLUSH_INTERVAL": 0.02,
            "TIMEOUT": 2.0,
            "BACKOFF_BASE": 0.01,
            "BACKOFF_CAP": 0.05,
            "MAX_RETRIES": 1,
            "TENANT": {"user_attr": "username"},
        }
        value.update(overrides)
        settings.METER = value
        return value

    return apply


def close_thread_connection() -> None:
    """For worker threads of a test: give their connection back."""
    connection.close()


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` is true (the sender works on its own thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def aget(path: str, data: Any = None, *, client: Any = None, **extra: Any) -> Any:
    """``AsyncClient().get(path, **extra)`` run to its end from sync test code (through a
    coroutine function: Django 4.2's ``get`` is a plain method returning a coroutine,
    which ``async_to_sync`` warns about)."""
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    async def get() -> Any:
        return await (client if client is not None else AsyncClient()).get(path, data, **extra)

    return async_to_sync(get)()
