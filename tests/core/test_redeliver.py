"""redeliver(): what it refuses, and a dry run without a client."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from meter_core import ConfigurationError, MeterClient, SQLiteSpool, UsageEvent, redeliver
from meter_core.devserver import DevServer


def stored_spool(path: Path, n: int) -> tuple[SQLiteSpool, list[str]]:
    spool = SQLiteSpool(path)
    events = [UsageEvent("acme", "d", "page.processed.basic", i + 1) for i in range(n)]
    spool.store(events, error="BackendUnavailable: down", attempts=2)
    return spool, [e.event_id for e in events]


def test_a_disabled_client_is_refused_before_anything_is_claimed(
    backend: DevServer, tmp_path: Path
) -> None:
    spool, ids = stored_spool(tmp_path / "s.db", 3)
    client = MeterClient(backend.url, internal_url=backend.url, enabled=False)
    with pytest.raises(ConfigurationError, match="disabled"):
        redeliver(spool, client)
    with pytest.raises(ConfigurationError, match="disabled"):
        redeliver(spool, client, dry_run=True)
    assert backend.records == []
    left = spool.claim(10)  # nothing was leased, marked or deleted
    assert sorted(s.event.event_id for s in left) == sorted(ids)
    assert {s.attempts for s in left} == {2}


def test_a_dry_run_needs_no_client(tmp_path: Path) -> None:
    spool, ids = stored_spool(tmp_path / "s.db", 3)
    report = redeliver(spool, None, dry_run=True, batch_size=2)
    assert (report.claimed, report.delivered, report.failed) == (3, 0, 0)
    assert "would resend 3 events" in report.summary()
    assert sorted(s.event.event_id for s in spool.claim(10)) == sorted(ids)


def test_resending_without_a_client_is_refused(tmp_path: Path) -> None:
    spool, _ = stored_spool(tmp_path / "s.db", 1)
    with pytest.raises(ValueError, match="client"):
        redeliver(spool, None)
    assert spool.pending_count() == 1
    assert len(spool.claim(10)) == 1


def test_a_failed_resend_is_due_again_within_two_minutes(
    tmp_path: Path, closed_port_url: str
) -> None:
    # Events reach the store after the sender's retries (6 attempts with the defaults): a
    # retry command run during the outage must not push them hours away, nor 10 minutes
    # past a 20 s blip (a worker running every minute then waited that long).
    spool = SQLiteSpool(tmp_path / "s.db")
    spool.store([UsageEvent("acme", "d", "page.processed.basic", 1)], error="down", attempts=6)
    client = MeterClient(closed_port_url, internal_url=closed_port_url, timeout=0.5)
    started = time.time()
    report = redeliver(spool, client)
    assert report.failed == 1
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
        [(attempts, due)] = db.execute("SELECT attempts, next_attempt_at FROM meter_events")
    assert attempts == 7
    assert started + 60 < due <= time.time() + 120


def test_the_lease_of_a_resend_outlasts_its_longest_attempt(closed_port_url: str) -> None:
    # With a long timeout, the default lease (300 s) could end while a request still runs
    # (3 tries of up to 2 timeouts each), and another worker could claim the same events.
    from meter_core import MemoryFailureStore

    leases: list[float] = []

    class RecordingStore(MemoryFailureStore):
        def claim(self, limit: int, **kwargs: Any) -> list[Any]:
            leases.append(kwargs["lease_seconds"])
            return super().claim(limit, **kwargs)

    store = RecordingStore(10)
    store.store([UsageEvent("acme", "d", "page.processed.basic", 1)], error="down", attempts=6)
    client = MeterClient(closed_port_url, internal_url=closed_port_url, timeout=60)
    redeliver(store, client)
    assert leases and min(leases) >= 9 * 60 + 5
