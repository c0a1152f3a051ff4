"""Several retry workers at once: every stored event is sent exactly once."""

from __future__ import annotations

import re
import threading
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from meter_core import UsageEvent
from meter_core.devserver import DevServer
from meter_django.models import FailedMeterEvent
from meter_django.store import DatabaseFailureStore
from tests.django_app.conftest import MeterSettings, postgres_only

pytestmark = [pytest.mark.django_db(transaction=True), postgres_only]

EVENTS = 300
WORKERS = 4


def _worker(results: list[Any], barrier: threading.Barrier) -> None:
    out = StringIO()
    try:
        barrier.wait(timeout=10)
        call_command("retry_meter_events", "--batch-size", "10", stdout=out)
        results.append(out.getvalue())
    except (CommandError, Exception) as exc:  # reported by the test
        results.append(exc)
    finally:
        connection.close()


def test_concurrent_workers_never_send_an_event_twice(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    events = [UsageEvent(f"t{i % 7}", "tests", "page.processed.basic", 1) for i in range(EVENTS)]
    DatabaseFailureStore().store(events, error="backend down", attempts=6)
    backend.set_fault("slow", delay=0.01)  # every batch takes a while: workers overlap
    results: list[Any] = []
    barrier = threading.Barrier(WORKERS)
    threads = [threading.Thread(target=_worker, args=(results, barrier)) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(r, str) for r in results), results
    ids = backend.event_ids()
    assert len(ids) == EVENTS
    assert len(set(ids)) == EVENTS  # zero double sends
    assert set(ids) == {e.event_id for e in events}
    assert set(FailedMeterEvent.objects.values_list("status", flat=True)) == {"delivered"}
    delivered = [int(re.search(r"resent \d+ events: (\d+) delivered", r)[1]) for r in results]
    assert sum(delivered) == EVENTS
    assert sum(1 for n in delivered if n) >= 2  # the work really was shared
