"""The sender resends the failure store's events that were given up on, once fresh
events go through again: a spool configured without a retry worker made an outage cost
more than no store at all (the events waited there for a command nobody ran)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from meter_core import MeterClient, SQLiteSpool, UsageEvent
from meter_core import sender as sender_module
from meter_core.devserver import DevServer
from tests.core.conftest import wait_until

RECORD = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 1}


def _owed(path: Path) -> dict[str, tuple[int, str, float]]:
    """Owed rows: event id -> (attempts, last error, lease end)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {
            event_id: (attempts, error, leased)
            for event_id, attempts, error, leased in db.execute(
                "SELECT event_id, attempts, last_error, claimed_until FROM meter_events"
                " WHERE status IN ('queued', 'failed')"
            )
        }


def _given_up(spool: SQLiteSpool, n: int, tenant: str = "acme", **kwargs: Any) -> list[str]:
    events = [UsageEvent(tenant, "d", "page.processed.basic", 1) for _ in range(n)]
    spool.store(events, error="produce failed: connection refused", attempts=6, **kwargs)
    return [e.event_id for e in events]


@pytest.mark.usefixtures("quick_recovery")
def test_events_stored_in_an_outage_are_resent_once_fresh_events_go_through(
    backend: DevServer, make_client: Any, tmp_path: Path
) -> None:
    spool = SQLiteSpool(tmp_path / "s.db")
    client: MeterClient = make_client(failure_store=spool, max_retries=1)
    backend.set_fault("down")
    ids = [client.record(**RECORD) for _ in range(5)]
    wait_until(lambda: spool.pending_count() == 5)  # (retries used: stored)
    assert client.stats()["failed"] == 5
    backend.clear_fault()
    ids.append(client.record(**RECORD))  # the backend takes fresh events again...
    wait_until(lambda: spool.pending_count() == 0)  # ... and the stored ones follow
    assert sorted(backend.event_ids()) == sorted(ids)
    wait_until(lambda: client.stats()["resent"] == 5)  # (counted once marked delivered)
    stats = client.stats()
    assert (stats["sent"], stats["resent"], stats["failed"]) == (6, 5, 5)


def test_another_process_events_and_only_due_ones_are_resent(
    backend: DevServer, make_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a pass comes STORE_RESEND_SECONDS after the sender starts, at a delivery)
    monkeypatch.setattr(sender_module, "STORE_RESEND_SECONDS", 0.05)
    spool = SQLiteSpool(tmp_path / "s.db")
    theirs = _given_up(spool, 3)  # (a worker that exited during an outage)
    later = _given_up(spool, 2, next_attempt_at=time.time() + 3600)  # backing off
    spilled = UsageEvent("acme", "d", "page.processed.basic", 1)
    spool.store([spilled])  # never tried (a full queue's spill, of a process now gone)
    tried_once = UsageEvent("acme", "d", "page.processed.basic", 1)
    spool.store([tried_once], error="down", attempts=1)  # (a spill tried once: stranded)
    client: MeterClient = make_client(failure_store=spool)
    mine = client.record(**RECORD)
    assert client.flush(timeout=10)
    time.sleep(0.1)
    client.record(**RECORD)  # (a delivery once the pass is due)
    wait_until(lambda: len(backend.event_ids()) >= 7)
    time.sleep(0.2)
    assert set(theirs) | {mine, tried_once.event_id, spilled.event_id} <= set(backend.event_ids())
    assert len(backend.event_ids()) == 7
    wait_until(lambda: client.stats()["sent"] == 7)  # (counted once marked delivered)
    stats = client.stats()  # (resent: those given up on, counted failed by whoever did)
    assert (stats["sent"], stats["resent"]) == (7, 3)
    left = _owed(tmp_path / "s.db")
    assert set(left) == set(later)
    assert all(leased < time.time() for _, _, leased in left.values())  # (given back)


def test_events_refused_again_back_off_and_the_pass_stops(
    backend: DevServer, make_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sender_module, "STORE_RESEND_SECONDS", 0.05)
    spool = SQLiteSpool(tmp_path / "s.db")
    ghosts = _given_up(spool, 2, tenant="ghost")
    backend.remove_customer("ghost")
    client: MeterClient = make_client(failure_store=spool)
    for _ in range(5):  # several passes' worth of fresh deliveries
        client.record(**RECORD)
        assert client.flush(timeout=10)
        time.sleep(0.06)
    rows = _owed(tmp_path / "s.db")
    assert set(rows) == set(ghosts)
    # tried once, then due again after the resend backoff (not at every pass)
    assert {attempts for attempts, _, _ in rows.values()} == {7}
    assert all("no customer account" in error for _, error, _ in rows.values())
    assert client.stats()["resent"] == 0


def test_durable_mode_leaves_given_up_events_to_the_retry_command(
    backend: DevServer, make_client: Any, tmp_path: Path
) -> None:
    spool = SQLiteSpool(tmp_path / "s.db")
    theirs = _given_up(spool, 2)
    client: MeterClient = make_client(failure_store=spool, durable=True)
    mine = client.record(**RECORD)
    assert client.flush(timeout=10)
    time.sleep(0.2)
    assert backend.event_ids() == [mine]
    assert spool.pending_count() == len(theirs)


def test_a_pass_waits_for_a_spell_of_failures_to_end_or_its_interval(
    backend: DevServer, make_client: Any, tmp_path: Path
) -> None:
    # An event refused for good is stored as the batch around it is delivered: it is not
    # resent at once (a pass comes after an outage, or every STORE_RESEND_SECONDS)
    spool = SQLiteSpool(tmp_path / "s.db")
    theirs = _given_up(spool, 2)
    client: MeterClient = make_client(failure_store=spool)
    client.record(**RECORD)
    assert client.flush(timeout=10)
    time.sleep(0.2)
    assert not set(theirs) & set(backend.event_ids())
    assert spool.pending_count() == 2


def test_a_locked_store_does_not_hold_up_delivery_while_a_pass_waits_on_it(
    backend: DevServer, make_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sender_module, "STORE_RESEND_SECONDS", 0.05)
    path = tmp_path / "s.db"
    spool = SQLiteSpool(path, busy_timeout=3.0)
    _given_up(spool, 1)
    client: MeterClient = make_client(failure_store=spool)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # (a backup, a long transaction elsewhere)
        waits = []
        for _ in range(10):  # passes come due meanwhile, each waiting on the lock
            sent_at = time.monotonic()
            event_id = client.record(**RECORD)
            wait_until(lambda: event_id in backend.event_ids())  # noqa: B023
            waits.append(time.monotonic() - sent_at)
            time.sleep(0.05)
        assert max(waits) < 2.0, waits  # never behind a 3 s wait on the lock
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_a_backlog_of_rows_refused_for_good_does_not_hold_back_the_others(
    backend: DevServer, make_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pass stopped at its first batch that delivered nothing: 6,000 rows of a tenant
    # without an account, due first, held real events back pass after pass.
    monkeypatch.setattr(sender_module, "STORE_RESEND_SECONDS", 0.05)
    spool = SQLiteSpool(tmp_path / "s.db")
    _given_up(spool, 1200, tenant="ghost")
    backend.remove_customer("ghost")
    real = _given_up(spool, 3)
    client: MeterClient = make_client(failure_store=spool)
    time.sleep(0.1)
    client.record(**RECORD)
    wait_until(lambda: set(real) <= set(backend.event_ids()), timeout=20)
    assert len(_owed(tmp_path / "s.db")) == 1200


@pytest.mark.usefixtures("quick_recovery")
def test_rows_a_retry_worker_pushed_back_in_an_outage_go_once_it_ends(
    backend: DevServer, make_client: Any, tmp_path: Path
) -> None:
    # A sidecar's failed runs during the outage put the rows 2 minutes out: the spool
    # emptied 2 minutes after recovery instead of at once.
    spool = SQLiteSpool(tmp_path / "s.db")
    pushed = _given_up(spool, 4, next_attempt_at=time.time() + 120)
    client: MeterClient = make_client(failure_store=spool, max_retries=0)
    backend.set_fault("down")
    for n in (1, 2):  # attempts failing one after another: an outage
        client.record(**RECORD)
        wait_until(lambda: client.stats()["failed"] == n)  # noqa: B023
    backend.clear_fault()
    client.record(**RECORD)  # the backend takes events again
    wait_until(lambda: set(pushed) <= set(backend.event_ids()))
    wait_until(lambda: spool.pending_count() == 0)


def test_close_with_a_backend_that_takes_events_sends_what_waits_for_a_retry(
    backend: DevServer, make_client: Any, tmp_path: Path
) -> None:
    # Events waiting for a retry went to the store at close even though the backend had
    # taken the events around them: 17 % of an app's events stopped soon after an outage.
    spool = SQLiteSpool(tmp_path / "s.db")
    client: MeterClient = make_client(
        failure_store=spool, flush_interval=0.3, backoff_base=5.0, backoff_cap=5.0
    )
    client.lookup_customer("acme")
    backend.set_fault("down", status=500, times=1)  # (the next request: t2's lookup)
    first = client.record(**RECORD)
    waiting = client.record(tenant_id="t2", meter_id="page.processed.basic", total_usage=1)
    wait_until(lambda: client.stats()["retried"] == 1)  # t2's event waits up to 5 s
    assert backend.event_ids() == [first]
    client.close(timeout=3)
    assert sorted(backend.event_ids()) == sorted([first, waiting])
    assert spool.pending_count() == 0


def test_one_event_failing_between_others_deliveries_keeps_its_backoff(
    backend: DevServer, make_client: Any, tmp_path: Path
) -> None:
    # Each delivery of another tenant after that event's failed retry counted as "the
    # backend is back": its retries went at once, again and again, its backoff lost.
    spool = SQLiteSpool(tmp_path / "s.db")
    client: MeterClient = make_client(
        failure_store=spool, backoff_base=30.0, backoff_cap=30.0, max_retries=5
    )
    client.lookup_customer("acme")
    bad = UsageEvent("acme", "d", "page.processed.basic", 1)
    backend.set_fault("record_errors", error_code=50003, event_ids=[bad.event_id])
    client.enqueue(bad)
    started = time.monotonic()
    while time.monotonic() - started < 3:
        client.record(**RECORD)
        time.sleep(0.1)
    tries = sum(bad.event_id in body.decode() for body in backend.raw_bodies)
    # the first try, and retries up to 30 s apart (with full jitter, three within 3 s
    # one time in 6,000); it was all six, one after each other tenant's delivery
    assert tries <= 4, tries
