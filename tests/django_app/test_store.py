"""DatabaseFailureStore: meter_core's FailureStore protocol on the project's database."""

from __future__ import annotations

import time

import pytest
from django.db import connection

from meter_core import FailureStore, StoreError, UsageEvent
from meter_django.models import FailedMeterEvent
from meter_django.store import DatabaseFailureStore

pytestmark = pytest.mark.django_db


def _event(tenant: str = "acme", meter: str = "page.processed.basic", n: int = 1) -> UsageEvent:
    return UsageEvent(tenant, "tests", meter, n)


def test_it_implements_the_protocol() -> None:
    assert isinstance(DatabaseFailureStore(), FailureStore)


def test_storing_twice_keeps_one_row_with_the_full_event() -> None:
    store = DatabaseFailureStore()
    event = _event(n=4)
    store.store([event])
    store.store([event])
    row = FailedMeterEvent.objects.get()
    assert str(row.event_id) == event.event_id
    assert row.status == "queued"
    assert row.payload == event.to_dict()
    assert (row.tenant_id, row.meter_id, row.device_id, row.total_usage) == (
        "acme",
        "page.processed.basic",
        "tests",
        4,
    )


def test_a_failure_updates_an_owed_event_but_never_a_delivered_one() -> None:
    store = DatabaseFailureStore()
    owed, done = _event(), _event()
    store.store([owed, done])
    store.mark_delivered([done.event_id])
    store.store([owed, done], error="backend down", attempts=6)
    store.store([owed], error="again", attempts=2)  # attempts are never lowered
    rows = {str(r.event_id): r for r in FailedMeterEvent.objects.all()}
    assert rows[owed.event_id].status == "failed"
    assert rows[owed.event_id].attempts == 6
    assert rows[owed.event_id].last_error == "again"
    assert rows[done.event_id].status == "delivered"


def test_a_claim_leases_events_until_released() -> None:
    store = DatabaseFailureStore()
    events = [_event() for _ in range(3)]
    store.store(events)
    first = store.claim(2)
    assert len(first) == 2
    second = store.claim(10)
    assert [s.event.event_id for s in second] == [events[2].event_id]
    assert store.claim(10) == []
    store.release([s.event.event_id for s in first])
    again = store.claim(10)
    assert {s.event.event_id for s in again} == {s.event.event_id for s in first}
    assert again[0].event == next(e for e in events if e.event_id == again[0].event.event_id)


def test_an_expired_lease_makes_events_due_again() -> None:
    store = DatabaseFailureStore()
    store.store([_event()])
    assert len(store.claim(5, lease_seconds=0)) == 1
    assert len(store.claim(5)) == 1


def test_a_failed_attempt_counts_and_pushes_the_event_back() -> None:
    store = DatabaseFailureStore()
    event = _event()
    store.store([event])
    [claimed] = store.claim(1)
    store.mark_failed([event.event_id], error="503", next_attempt_at=time.time() + 60)
    row = FailedMeterEvent.objects.get()
    assert (row.status, row.attempts, row.last_error, row.claim_token) == ("failed", 1, "503", "")
    assert store.claim(5) == []
    store.mark_failed([event.event_id], error="503", next_attempt_at=time.time() - 1)
    [due] = store.claim(5)
    assert due.attempts == 2
    assert claimed.attempts == 0


def test_claim_filters_by_attempts_tenant_and_meter() -> None:
    store = DatabaseFailureStore()
    tired = _event()
    store.store([tired], error="x", attempts=5)
    store.store([_event(tenant="globex"), _event(meter="report.generated.small")])
    assert store.claim(10, max_attempts=5, lease_seconds=0)
    assert tired.event_id not in {
        s.event.event_id for s in store.claim(10, max_attempts=5, lease_seconds=0)
    }
    assert [s.event.tenant_id for s in store.claim(10, tenant_id="globex", lease_seconds=0)] == [
        "globex"
    ]
    assert [
        s.event.meter_id
        for s in store.claim(10, meter_id="report.generated.small", lease_seconds=0)
    ] == ["report.generated.small"]


def test_a_restricted_view_claims_chosen_events_even_when_not_due() -> None:
    store = DatabaseFailureStore()
    later, other = _event(), _event()
    store.store([later, other], error="x", next_attempt_at=time.time() + 3600)
    assert store.claim(10) == []
    view = store.only([later.event_id])
    [claimed] = view.claim(10)
    assert claimed.event.event_id == later.event_id
    view.mark_failed([later.event_id], error="503", next_attempt_at=time.time() + 60)
    assert view.claim(10) == []  # one run resends a chosen event once


def test_discard_and_counts() -> None:
    store = DatabaseFailureStore()
    a, b, c = _event(), _event(), _event()
    store.store([a])
    store.store([b, c], error="backend down")
    assert store.discard([c.event_id]) == 1
    assert store.discard([c.event_id]) == 0
    assert store.claim(10, lease_seconds=0) and store.claim(10) != [c]
    counts = store.counts()
    assert counts["by_status"] == {"queued": 1, "failed": 1, "discarded": 1}
    assert counts["by_reason"] == {"queued": 1, "failed: backend down": 1}
    assert store.pending_by_meter() == {"page.processed.basic": 2}


def test_an_unreadable_payload_is_discarded_not_sent() -> None:
    store = DatabaseFailureStore()
    good = _event()
    store.store([good, _event()])
    FailedMeterEvent.objects.exclude(event_id=good.event_id).update(payload={"broken": True})
    claimed = store.claim(10)
    assert [s.event.event_id for s in claimed] == [good.event_id]
    assert FailedMeterEvent.objects.filter(status="discarded").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_claim_waits_for_a_writer_instead_of_failing_with_database_is_locked() -> None:
    # Durable mode on SQLite: a request writes its event in its own transaction while the
    # sender claims. A claim that reads first and then upgrades to a write lock would fail
    # at once with "database is locked"; a claim must wait for the writer instead.
    import threading

    from django.db import connections, transaction

    store = DatabaseFailureStore()
    waiting = _event()
    store.store([waiting])
    writing = threading.Event()

    def request_in_a_transaction() -> None:
        try:
            with transaction.atomic():
                store.store([_event()])
                writing.set()
                time.sleep(0.3)
        finally:
            connections.close_all()

    writer = threading.Thread(target=request_in_a_transaction)
    writer.start()
    try:
        assert writing.wait(5)
        claimed = store.claim(10)
    finally:
        writer.join()
    assert waiting.event_id in {s.event.event_id for s in claimed}


def test_a_table_never_migrated_is_named_with_the_command_that_creates_it() -> None:
    # (the test's transaction puts the table back afterwards)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE {FailedMeterEvent._meta.db_table}")
    with pytest.raises(StoreError, match="run manage.py migrate meter_django"):
        DatabaseFailureStore().store([_event()])


def test_the_hint_names_the_database_of_the_table() -> None:
    from meter_django.store import _missing_table_hint

    error = Exception('relation "meter_django_failedmeterevent" does not exist')
    assert _missing_table_hint(error, "meter").endswith(
        "run manage.py migrate meter_django --database meter)"
    )
    assert _missing_table_hint(Exception("disk I/O error"), "default") == ""
