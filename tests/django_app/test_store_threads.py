"""The failure store and database connections across threads: a caller's thread keeps its
own connection, the sender thread keeps one between polls and gives it back when the
client closes or a test database is dropped; times with ``USE_TZ = False``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from io import StringIO
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.test import TransactionTestCase
from django.utils import timezone

from meter_core import StoreError, UsageEvent
from meter_core.devserver import DevServer
from meter_django import get_client, record_usage, reset_client
from meter_django.models import FailedMeterEvent
from meter_django.store import DatabaseFailureStore
from tests.django_app.conftest import ON_POSTGRES, MeterSettings, wait_for

postgres_server = pytest.mark.skipif(
    not ON_POSTGRES,
    reason="needs a PostgreSQL server (pg_terminate_backend, DROP DATABASE refused while "
    "another session is connected): run with METER_TEST_DB=postgres",
)

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
METER_ID = "page.processed.basic"


def _in_worker_thread(job: Callable[[], None]) -> None:
    """Run ``job`` in a thread other than the main thread (a threaded server's request
    thread, a ThreadPoolExecutor worker); re-raise what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run, name="worker")
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def _delivered(event_id: str) -> bool:
    return FailedMeterEvent.objects.filter(event_id=event_id, status="delivered").exists()


@pytest.fixture
def sender_connections() -> Iterator[list[BaseDatabaseWrapper]]:
    """Every database connection opened on a meter sender thread during the test."""
    opened: list[BaseDatabaseWrapper] = []

    def receiver(*, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
        if threading.current_thread().name == "meter-sender":
            opened.append(connection)

    connection_created.connect(receiver, dispatch_uid="test_store_threads.sender")
    yield opened
    connection_created.disconnect(dispatch_uid="test_store_threads.sender")


# -- bug: a durable write closed the caller's own connection in a worker thread ------------


def test_recording_per_row_of_an_iterator_in_a_worker_thread_keeps_its_connection(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings(DURABLE=True)
    User.objects.bulk_create([User(username=f"user{i}") for i in range(10)])
    ids: list[str] = []

    def per_row() -> None:
        connection.ensure_connection()
        own = connection.connection
        users = User.objects.order_by("id")
        # A server-side cursor over the rows while recording (PostgreSQL). On SQLite an
        # open read cursor holds a lock that this thread's write and the sender's claim
        # can deadlock on, whatever the store does: rows fetched first there.
        rows = users.iterator(chunk_size=2) if connection.vendor != "sqlite" else list(users)
        for user in rows:
            ids.append(record_usage(tenant_id=user.username, meter_id=METER_ID, total_usage=1))
            assert connection.connection is own  # the store left the caller's connection

    _in_worker_thread(per_row)
    assert len(ids) == 10
    wait_for(lambda: sorted(backend.event_ids()) == sorted(ids))


def test_a_manual_transaction_of_a_worker_thread_commits_or_rolls_back_with_its_event(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings(DURABLE=True)
    ids: list[str] = []

    def manual(commit: bool) -> None:
        transaction.set_autocommit(False)
        try:
            User.objects.create(username=f"manual-{commit}")
            ids.append(record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=1))
            if commit:
                transaction.commit()
            else:
                transaction.rollback()
        finally:
            transaction.set_autocommit(True)

    _in_worker_thread(lambda: manual(False))
    _in_worker_thread(lambda: manual(True))
    rolled_back, committed = ids
    assert list(User.objects.values_list("username", flat=True)) == ["manual-True"]
    wait_for(lambda: _delivered(committed))
    time.sleep(0.2)  # several polls of the sender
    assert backend.event_ids() == [committed]  # the rolled-back work is never billed
    assert not FailedMeterEvent.objects.filter(event_id=rolled_back).exists()


# -- bug: the sender opened a new connection at every poll ------------------------------


def test_an_idle_sender_keeps_one_connection_and_gives_it_back_when_the_client_closes(
    meter_settings: MeterSettings,
    backend: DevServer,
    sender_connections: list[BaseDatabaseWrapper],
) -> None:
    meter_settings(DURABLE=True)  # FLUSH_INTERVAL 0.02 s: 25 polls in half a second
    with transaction.atomic():
        event_id = record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=1)
    wait_for(lambda: _delivered(event_id))
    time.sleep(0.5)  # idle
    assert len(sender_connections) == 1  # opened once, kept from one poll to the next
    [conn] = sender_connections
    assert conn.connection is not None
    reset_client()  # as override_settings, the test runner's teardown or a worker exit
    assert conn.connection is None  # closed with its client: no connection left behind


@postgres_server
def test_after_a_database_error_the_sender_reconnects_and_goes_on(
    meter_settings: MeterSettings,
    backend: DevServer,
    sender_connections: list[BaseDatabaseWrapper],
) -> None:
    meter_settings(DURABLE=True)
    first = record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=1)
    wait_for(lambda: _delivered(first))
    [conn] = sender_connections
    backend_pid = conn.connection.info.backend_pid
    with connection.cursor() as cursor:  # the server drops it (a restart, a failover)
        cursor.execute("SELECT pg_terminate_backend(%s)", [backend_pid])
    time.sleep(0.2)
    second = record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=2)
    wait_for(lambda: _delivered(second))
    assert sorted(backend.event_ids()) == sorted([first, second])
    assert len(sender_connections) == 2  # one new connection, not one per poll


@postgres_server
def test_an_idle_sender_connection_cut_meanwhile_is_replaced_before_a_failed_batch_is_stored(
    meter_settings: MeterSettings,
    sender_connections: list[BaseDatabaseWrapper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Default mode, backend down: failed events go to the table from the sender thread,
    # whose connection then sits idle until the next failure, and may be cut meanwhile.
    monkeypatch.setattr("meter_django.store._IDLE_CHECK_SECONDS", 0.2)
    meter_settings(KAFKA_URL="http://127.0.0.1:9", INTERNAL_URL="http://127.0.0.1:9",
                   MAX_RETRIES=0, TIMEOUT=0.5)  # fmt: skip
    first = record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=1)
    wait_for(lambda: FailedMeterEvent.objects.filter(event_id=first).exists())
    [conn] = sender_connections
    with connection.cursor() as cursor:  # a restart, a failover, a proxy's idle timeout
        cursor.execute("SELECT pg_terminate_backend(%s)", [conn.connection.info.backend_pid])
    time.sleep(0.5)
    second = record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=2)
    wait_for(lambda: FailedMeterEvent.objects.filter(event_id=second).exists())
    assert get_client().stats()["failed_in_memory"] == 0  # nothing kept in memory only


# -- bug: a test database could not be dropped while the sender held a connection ---------


@postgres_server
def test_opening_a_connection_without_a_database_releases_the_senders_connection(
    meter_settings: MeterSettings,
    backend: DevServer,
    sender_connections: list[BaseDatabaseWrapper],
) -> None:
    # What the test runner does before it creates or drops a test database.
    meter_settings(DURABLE=True)
    event_id = record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=1)
    wait_for(lambda: _delivered(event_id))
    client = get_client()
    [conn] = sender_connections
    with connection._nodb_cursor() as cursor:
        cursor.execute("SELECT 1")
    assert conn.connection is None
    assert get_client() is not client  # the next use builds a fresh client


class TeardownProbe(TransactionTestCase):
    """A project's own test, run by Django's test runner in a subprocess (below)."""

    __test__ = False  # (not collected by pytest)

    def test_durable_usage_is_delivered(self) -> None:
        event_id = record_usage(tenant_id="acme", meter_id=METER_ID, total_usage=1)
        wait_for(lambda: _delivered(event_id))
        time.sleep(0.3)  # the sender polls on, holding its connection


_RUN_PROBE = """
import os, sys
import django
from django.conf import settings
django.setup()
db = settings.DATABASES["default"]
max_age = os.environ["PROBE_CONN_MAX_AGE"]
db["CONN_MAX_AGE"] = None if max_age == "none" else int(max_age)
db["TEST"]["NAME"] = os.environ["PROBE_TEST_DB"]
settings.METER = {
    "KAFKA_URL": os.environ["PROBE_BACKEND"], "INTERNAL_URL": os.environ["PROBE_BACKEND"],
    "DEVICE_ID": "tests", "ENABLED": True, "DURABLE": True, "FLUSH_INTERVAL": 0.05,
}
from django.test.runner import DiscoverRunner
failures = DiscoverRunner(verbosity=0, interactive=False).run_tests(
    ["tests.django_app.test_store_threads.TeardownProbe"]
)
print("probe failures:", failures)
sys.exit(1 if failures else 0)
"""


@postgres_server
@pytest.mark.parametrize("max_age", ["0", "none"])
def test_a_django_test_run_with_durable_metering_tears_down_cleanly(
    backend: DevServer, max_age: str
) -> None:
    test_db = f"test_meter_teardown_{os.getpid()}_{max_age}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.django_settings",
        "METER_TEST_DB": "postgres",
        "PYTHONPATH": str(ROOT),
        "PROBE_CONN_MAX_AGE": max_age,
        "PROBE_TEST_DB": test_db,
        "PROBE_BACKEND": backend.url,
    }
    try:
        run = subprocess.run(
            [sys.executable, "-c", _RUN_PROBE],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert "probe failures: 0" in output
        assert "Traceback" not in output, output  # no StoreError after the teardown either
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [test_db])
            assert cursor.fetchone() == (0,)  # dropped
        assert len(backend.event_ids()) == 1
    finally:
        with connection._nodb_cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{test_db}" WITH (FORCE)')


# -- bug: USE_TZ = False; any error of a call is a StoreError ----------------------------


def test_times_are_naive_in_the_default_time_zone_when_use_tz_is_false(settings: Any) -> None:
    settings.USE_TZ = False
    settings.TIME_ZONE = "America/New_York"
    local = ZoneInfo("America/New_York")
    store = DatabaseFailureStore()
    event = UsageEvent("acme", "tests", METER_ID, 1)
    due = float(int(time.time()) - 60)
    store.store([event], error="backend down", attempts=1, next_attempt_at=due)
    row = FailedMeterEvent.objects.get(event_id=event.event_id)
    assert row.next_attempt_at == datetime.fromtimestamp(due, local).replace(tzinfo=None)

    [claimed] = store.claim(10)
    assert claimed.next_attempt_at == due
    later = due + 3600
    store.mark_failed([event.event_id], error="still down", next_attempt_at=later)
    row.refresh_from_db()
    assert row.next_attempt_at == datetime.fromtimestamp(later, local).replace(tzinfo=None)
    assert (row.attempts, row.leased_until, row.claim_token) == (2, None, "")
    assert store.claim(10) == []  # due in an hour


def test_the_retry_command_works_when_use_tz_is_false(
    settings: Any, meter_settings: MeterSettings, backend: DevServer
) -> None:
    settings.USE_TZ = False
    meter_settings()
    events = [UsageEvent("acme", "tests", METER_ID, 1) for _ in range(3)]
    DatabaseFailureStore().store(events, error="backend down", attempts=2)
    backend.set_fault("down")
    with pytest.raises(CommandError, match="still failed"):
        call_command("retry_meter_events", stdout=StringIO())
    rows = FailedMeterEvent.objects.all()
    assert {(r.status, r.attempts, r.leased_until) for r in rows} == {("failed", 3, None)}

    backend.clear_fault()
    FailedMeterEvent.objects.update(next_attempt_at=timezone.now())  # due again now
    call_command("retry_meter_events", stdout=StringIO())
    assert sorted(backend.event_ids()) == sorted(e.event_id for e in events)


def test_any_error_of_a_call_is_raised_as_a_store_error() -> None:
    store = DatabaseFailureStore()
    event = UsageEvent("acme", "tests", METER_ID, 1)
    with pytest.raises(StoreError, match="meter event table"):
        store.store([event], error="backend down", next_attempt_at=1e20)  # year out of range
    assert not FailedMeterEvent.objects.exists()


def test_the_stores_short_lived_threads_are_those_meter_core_starts() -> None:
    # (their connection is closed after each call: one left open by a thread that ended
    # stays open until the database drops it)
    from meter_core import sender
    from meter_django import store

    assert sender.STORE_RESEND_THREAD_NAME in store.SHORT_LIVED_THREAD_NAMES
    assert store.SENDER_THREAD_NAME == "meter-sender"
