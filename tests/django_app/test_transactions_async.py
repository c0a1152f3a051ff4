"""Which transaction decides (the meter table on its own database), async recording
(arecord_usage, usage callables under ASGI), ATOMIC_REQUESTS rollbacks and streaming
responses. Real databases (SQLite, and PostgreSQL with METER_TEST_DB=postgres), the real
local backend, Django's test clients (WSGI and ASGI stacks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections, transaction
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, TestCase

from meter_core import LogThrottle, capture_events
from meter_core.devserver import DevServer
from meter_django import get_client, metering, record_usage, reset_client
from meter_django.models import FailedMeterEvent
from tests.django_app.conftest import MeterSettings, aget, wait_for

URLS = "tests.django_app.urls_transactions_async"
TRUSTED = {"header": "X-Tenant", "trusted": True}
H = {"X-Tenant": "acme"}


def _totals(events: Any) -> dict[str, int]:
    totals: dict[str, int] = {}
    for event in events:
        totals[event.meter_id] = totals.get(event.meter_id, 0) + event.total_usage
    return totals


@pytest.fixture
def urls(settings: Any) -> None:
    settings.ROOT_URLCONF = URLS


@pytest.fixture
def quiet(meter_settings: MeterSettings, urls: None) -> MeterSettings:
    """METER with a trusted tenant header, events captured, not sent."""

    def apply(**overrides: Any) -> dict[str, Any]:
        return meter_settings(**{"ENABLED": False, "TENANT": TRUSTED, **overrides})

    return apply


# -- 1. the caller's transaction decides, not the meter table's database ---------------


@pytest.fixture
def meter_db(django_db_setup: None, django_db_blocker: Any, tmp_path: Any) -> Iterator[str]:
    """A second database, "meter", holding the FailedMeterEvent table alone (a SQLite
    file, also when the default database is PostgreSQL). Added while the test runs, so
    not through pytest-django's test case (it checks its databases when it starts):
    transactions commit for real, and the rows the test made are removed after it."""
    alias = "meter"
    assert alias not in connections.settings
    configured = connections.configure_settings(
        {
            "default": dict(connections.settings["default"]),
            alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "m.db")},
        }
    )
    with django_db_blocker.unblock():
        connections.settings[alias] = configured[alias]
        try:
            with connections[alias].schema_editor() as editor:
                editor.create_model(FailedMeterEvent)
            yield alias
        finally:
            reset_client()  # the sender thread uses the database too
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]
            User.objects.all().delete()
            FailedMeterEvent.objects.all().delete()


class Refused(Exception):
    pass


@pytest.mark.parametrize("durable", [False, True], ids=["default-mode", "durable"])
def test_rolled_back_work_is_not_billed_with_the_table_on_another_database(
    meter_settings: MeterSettings, backend: DevServer, meter_db: str, durable: bool
) -> None:
    meter_settings(DATABASE=meter_db, DURABLE=durable)
    lost: list[str] = []

    def refused() -> None:  # the README's pattern, rolled back
        with transaction.atomic():
            User.objects.create(username="lost")
            lost.append(record_usage(tenant_id="acme", meter_id="template.licensed.total",
                                     total_usage=1))  # fmt: skip
            raise Refused

    with pytest.raises(Refused):
        refused()
    assert not User.objects.filter(username="lost").exists()

    with transaction.atomic():
        User.objects.create(username="kept")
        kept = record_usage(tenant_id="acme", meter_id="template.licensed.total", total_usage=2)
        time.sleep(0.1)
        assert get_client().flush(2)
        assert backend.event_ids() == []  # not before the commit
    wait_for(lambda: backend.event_ids() == [kept])
    assert get_client().flush(5)
    time.sleep(0.2)
    assert backend.event_ids() == [kept]
    rows = FailedMeterEvent.objects.using(meter_db)
    assert not rows.filter(event_id=lost[0]).exists()
    if durable:  # the outbox row, written after the commit on the meter database
        wait_for(lambda: rows.get(event_id=kept).status == "delivered")


def test_using_names_the_database_whose_transaction_decides(
    meter_settings: MeterSettings, backend: DevServer, meter_db: str
) -> None:
    meter_settings(DATABASE=meter_db)
    lost: list[str] = []

    def refused_on_the_named_database() -> None:
        with transaction.atomic(using=meter_db):
            lost.append(record_usage(tenant_id="acme", meter_id="page.processed.basic",
                                     total_usage=1, using=meter_db))  # fmt: skip
            raise Refused

    def refused_on_one_of_two() -> None:
        # both databases in a transaction, the work on default: using names it (without
        # it, the meter table's transaction would decide)
        with transaction.atomic():
            with transaction.atomic(using=meter_db):
                lost.append(record_usage(tenant_id="acme", meter_id="page.processed.basic",
                                         total_usage=1, using="default"))  # fmt: skip
            raise Refused

    with pytest.raises(Refused):
        refused_on_the_named_database()
    with pytest.raises(Refused):
        refused_on_one_of_two()
    with transaction.atomic(), transaction.atomic(using=meter_db):
        kept = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=3)
    assert get_client().flush(5)
    time.sleep(0.2)
    assert backend.event_ids() == [kept]


def test_a_test_wrapping_several_databases_captures_usage_on_the_tables_database(
    meter_settings: MeterSettings,
    backend: DevServer,
    meter_db: str,
) -> None:
    meter_settings()  # the table on default
    # what a TestCase on two databases does: a transaction on each, never committed
    with transaction.atomic(), transaction.atomic(using=meter_db):
        with TestCase.captureOnCommitCallbacks(execute=True):  # (default's callbacks)
            kept = record_usage(tenant_id="acme", meter_id="page.processed.basic",
                                total_usage=4)  # fmt: skip
        assert get_client().flush(5)
        wait_for(lambda: backend.event_ids() == [kept])
        transaction.set_rollback(True, using=meter_db)
        transaction.set_rollback(True)


# -- 2. async code records with arecord_usage -----------------------------------------


def test_record_usage_on_an_event_loop_in_durable_mode_names_arecord_usage(
    meter_settings: MeterSettings, transactional_db: None
) -> None:
    meter_settings(DURABLE=True)

    async def call() -> str:
        return record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)

    with pytest.raises(SynchronousOnlyOperation, match=r"arecord_usage"):
        asyncio.run(call())
    assert not FailedMeterEvent.objects.exists()


def test_sync_record_usage_in_an_async_view_spills_a_full_queue_to_the_table(
    meter_settings: MeterSettings, backend: DevServer, urls: None, transactional_db: None
) -> None:
    # Default mode: record_usage() only queues, so async code may call it; a full queue
    # spills to the table, which Django refuses on the event loop's thread: the write is
    # made on another thread.
    meter_settings(MAX_QUEUE=1, FLUSH_INTERVAL=60)
    client = AsyncClient()
    for _ in range(3):
        assert aget("/async-record-sync/", client=client).status_code == 200
    stats = get_client().stats()
    assert stats["dropped"] == 0 and stats["stored"] >= 1  # (one or two did not fit)
    assert get_client().flush(10)
    wait_for(lambda: len(set(backend.event_ids())) == 3)


def test_a_spill_from_the_loop_does_not_hold_it_for_a_lock_its_caller_holds(
    meter_settings: MeterSettings, backend: DevServer, transactional_db: None
) -> None:
    # Sync code in a transaction (holding SQLite's write lock) calls async code, which
    # calls the sync record_usage() while the queue is full: the spill's write waits for
    # that lock, which is freed only once the loop has finished. The loop waits for it
    # briefly, then lets it go on; the event is written once the lock is free.
    meter_settings(MAX_QUEUE=1, FLUSH_INTERVAL=60)

    async def record_three() -> tuple[float, list[str]]:
        started = time.monotonic()
        ids = [
            record_usage(tenant_id="acme", meter_id="template.licensed.total", total_usage=1)
            for _ in range(3)
        ]
        return time.monotonic() - started, ids

    with transaction.atomic():
        User.objects.create(username="holds the write lock")
        took, ids = async_to_sync(record_three)()
    assert took < 2.5  # (not a busy timeout, 5 s, per spilled event)
    assert get_client().flush(10)

    def everywhere() -> set[str]:
        stored = {str(i) for i in FailedMeterEvent.objects.values_list("event_id", flat=True)}
        return stored | set(backend.event_ids())

    wait_for(lambda: everywhere() == set(ids))  # none lost: sent, or in the table


def test_sync_record_usage_in_an_async_view_keeps_usage_when_misconfigured(
    meter_settings: MeterSettings, urls: None, transactional_db: None
) -> None:
    meter_settings(KAFKA_URL="not a url")
    assert aget("/async-record-sync/").status_code == 200
    row = FailedMeterEvent.objects.get()  # for the retry command, once the settings are fixed
    assert (row.meter_id, row.total_usage, row.status) == ("template.licensed.total", 1, "failed")


def test_durable_work_committed_while_the_meter_database_fails_is_billed_from_memory(
    meter_settings: MeterSettings, backend: DevServer, meter_db: str
) -> None:
    # The table on its own database, written after the work's commit: when that write
    # fails, record_usage() has returned long ago and cannot say so.
    meter_settings(DATABASE=meter_db, DURABLE=True)
    with connections[meter_db].schema_editor() as editor:
        editor.delete_model(FailedMeterEvent)  # the meter database refuses every write
    with transaction.atomic():
        User.objects.create(username="kept")
        kept = record_usage(tenant_id="acme", meter_id="template.licensed.total", total_usage=2)
    wait_for(lambda: backend.event_ids() == [kept])


def test_arecord_usage_and_arecord_session_in_durable_mode(
    meter_settings: MeterSettings, backend: DevServer, transactional_db: None
) -> None:
    import meter_django

    meter_settings(DURABLE=True)

    async def call() -> list[str]:
        return [
            await meter_django.arecord_usage(
                tenant_id="acme", meter_id="page.processed.basic", total_usage=4
            ),
            await meter_django.arecord_session(
                tenant_id="acme", meter_id="chat.on.time_hours", start_time=1_700_000_000_000
            ),
        ]

    ids = async_to_sync(call)()
    rows = FailedMeterEvent.objects.all()
    assert {str(i) for i in rows.values_list("event_id", flat=True)} == set(ids)
    wait_for(lambda: sorted(backend.event_ids()) == sorted(ids))
    wait_for(lambda: not rows.exclude(status="delivered").exists())


def test_async_view_records_with_arecord_usage_in_durable_mode(
    meter_settings: MeterSettings, backend: DevServer, urls: None, transactional_db: None
) -> None:
    meter_settings(DURABLE=True, TENANT=TRUSTED)
    response = aget("/async-record/", headers=H)
    assert response.status_code == 200
    wait_for(lambda: len(backend.event_ids()) == 2)
    rows = FailedMeterEvent.objects.all()
    assert rows.count() == 2
    wait_for(lambda: not rows.exclude(status="delivered").exists())


def test_record_usage_on_an_event_loop_keeps_working_outside_durable_mode(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()

    async def call() -> str:
        return record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)

    event_id = asyncio.run(call())
    assert get_client().flush(5)
    assert backend.event_ids() == [event_id]


# -- 3. usage callables that query the database, under ASGI ---------------------------


def count_users(request: HttpRequest, response: HttpResponse) -> int:
    return User.objects.count() + 1


def username_length(request: HttpRequest, response: HttpResponse) -> int:
    return len(request.user.username)  # the lazy request.user: a session and a user query


@pytest.mark.django_db(transaction=True)
def test_usage_callables_that_query_the_database_are_billed_under_asgi(
    quiet: MeterSettings,
) -> None:
    quiet(
        RULES={
            "GET /async-plain/": {"meter": "report.generated.small", "usage": count_users},
            "GET /plain/": {"meter": "report.generated.medium", "usage": username_length},
        }
    )
    user = User.objects.create(username="alice7")
    client = AsyncClient()
    client.force_login(user)
    with capture_events() as events:
        assert aget("/async-plain/", client=client, headers=H).status_code == 200
        assert aget("/plain/", client=client, headers=H).status_code == 200
    assert _totals(events) == {"report.generated.small": 2, "report.generated.medium": 6}


# -- 4. streaming responses ------------------------------------------------------------


def test_usage_added_while_a_response_streams_is_billed_once_it_is_sent(
    quiet: MeterSettings,
) -> None:
    quiet(RULES={"GET /stream/": {"meter": "report.generated.small", "header": "X-Rows"}})
    with capture_events() as events:
        response = Client().get("/stream/", headers=H)
        assert "X-Rows" not in response.headers  # removed before the headers leave
        assert list(events) == []
        assert b"".join(response.streaming_content) == b"chunk\n" * 3
    assert _totals(events) == {"page.processed.basic": 3, "report.generated.small": 5}


def test_a_stream_cut_short_is_not_billed(quiet: MeterSettings, django_db_blocker: Any) -> None:
    quiet(RULES={"GET /stream/": "report.generated.small"})
    with capture_events() as events:
        response = Client().get("/stream/", headers=H)
        parts = iter(response.streaming_content)
        assert next(parts) == b"chunk\n"
        # the client left: the server closes the response (Django's request_finished
        # then closes the connections, as after any request)
        with django_db_blocker.unblock():
            response.close()
    assert list(events) == []


def test_an_async_stream_under_asgi_is_billed_once_it_is_sent(quiet: MeterSettings) -> None:
    quiet()

    async def fetch() -> bytes:
        response = await AsyncClient().get("/astream/", headers=H)
        return b"".join([part async for part in response.streaming_content])

    with capture_events() as events:
        assert async_to_sync(fetch)() == b"chunk\n" * 2
    assert _totals(events) == {"page.processed.basic": 2}


def test_usage_added_after_the_request_was_metered_logs_a_warning(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metering, "_late_add", LogThrottle(metering.logger))
    quiet()
    with capture_events() as events:
        response = Client().get("/plain/", headers=H)
    with caplog.at_level(logging.WARNING, logger="meter.django"):
        response.wsgi_request.meter.add("page.processed.basic", 1)
    assert list(events) == []
    assert "after GET /plain/ was metered: not billed" in caplog.text
