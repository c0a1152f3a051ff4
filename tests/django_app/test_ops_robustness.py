"""Operations under real trouble: the retry worker through database errors and dropped
connections, the admin on a meter database of its own without a router, and "retry now"
under ATOMIC_REQUESTS. Real databases and the real local backend, no mocks."""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.messages.storage.fallback import FallbackStorage
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.urls import reverse

from meter_core import StoreError, UsageEvent
from meter_core.devserver import DevServer
from meter_django import get_client, record_usage
from meter_django.checks import check_settings
from meter_django.decorators import meter
from meter_django.models import FailedMeterEvent
from meter_django.store import DatabaseFailureStore
from tests.django_app.conftest import ON_POSTGRES, MeterSettings, aget, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

TABLE = FailedMeterEvent._meta.db_table
CHANGELIST = "admin:meter_django_failedmeterevent_changelist"
LATER = datetime(2999, 1, 1, tzinfo=timezone.utc)

postgres_only = pytest.mark.skipif(
    not ON_POSTGRES,
    reason="drops the connection with pg_terminate_backend (run with METER_TEST_DB=postgres)",
)


def _stored(n: int, *, using: str = "default", due: bool = True) -> list[str]:
    events = [UsageEvent(f"t{i}", "tests", "page.processed.basic", 1) for i in range(n)]
    DatabaseFailureStore(using).store(events, error="backend down: 503", attempts=1)
    ids = [e.event_id for e in events]
    if not due:
        FailedMeterEvent.objects.using(using).filter(event_id__in=ids).update(next_attempt_at=LATER)
    return ids


class _Hooked(StringIO):
    """An output stream that calls ``hook(text)`` for every write (from the command's
    own thread, between its database calls)."""

    def __init__(self, hook: Callable[[str], None]) -> None:
        super().__init__()
        self._hook = hook

    def write(self, text: str) -> int:
        n = super().write(text)
        self._hook(text)
        return n


class _Side:
    """A second connection to the test database, as another process (a DBA, a deploy,
    the database server itself) would have."""

    def __init__(self) -> None:
        params = connection.settings_dict
        self.vendor = connection.vendor
        if self.vendor == "postgresql":
            import psycopg

            self.pg = psycopg.connect(
                dbname=params["NAME"],
                user=params["USER"],
                host=params["HOST"],
                port=params["PORT"],
                autocommit=True,
            )
        else:
            self.lite = sqlite3.connect(params["NAME"], isolation_level=None)

    def run(self, sql: str, *args: Any) -> Any:
        if self.vendor == "postgresql":
            cursor = self.pg.execute(sql, args)
            return cursor.fetchall() if cursor.description else []
        return self.lite.execute(sql.replace("%s", "?"), args).fetchall()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the table back, if a failed test left it
            self.run(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")
        (self.pg if self.vendor == "postgresql" else self.lite).close()


@pytest.fixture
def side() -> Iterator[_Side]:
    other = _Side()
    yield other
    other.close()
    connection.close()  # whatever state the command left it in


# -- 1. the --loop worker through database trouble --------------------------------------


def _is_summary(text: str) -> bool:
    """A run's summary line of a --loop worker (it begins with the time of the run)."""
    return re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d resent ", text) is not None


def test_loop_survives_a_failed_run_and_resends_later_events(
    meter_settings: MeterSettings, backend: DevServer, side: _Side
) -> None:
    """A run that fails on the database (here its table is briefly gone, as during a
    botched migration or a restore) is reported on one line and the loop carries on."""
    meter_settings()
    first = _stored(2)
    later = _stored(3, due=False)
    summaries: list[str] = []

    def on_out(text: str) -> None:
        if _is_summary(text) and not summaries:
            summaries.append(text)
            side.run(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_away")

    def on_err(text: str) -> None:
        if "run failed" in text:
            side.run(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")
            side.run(f"UPDATE {TABLE} SET next_attempt_at = %s", datetime.now(timezone.utc))

    out, err = _Hooked(on_out), _Hooked(on_err)
    call_command(
        "retry_meter_events", "--loop", "--interval", "0", "--runs", "3", stdout=out, stderr=err
    )
    assert sorted(backend.event_ids()) == sorted(first + later)  # each once
    errors = err.getvalue().strip().splitlines()
    assert len(errors) == 1, errors  # one line, no traceback at default verbosity
    assert "run failed: database error: meter event table (default)" in errors[0]
    assert "next run in 0s" in errors[0]
    assert set(FailedMeterEvent.objects.values_list("status", flat=True)) == {"delivered"}


@postgres_only
def test_loop_survives_a_dropped_connection(
    meter_settings: MeterSettings,
    backend: DevServer,
    side: _Side,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database restarts (or fails over, or an idle timeout hits) while the worker
    keeps a persistent connection (CONN_MAX_AGE): the next run fails, the one after
    reconnects and resends."""
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    meter_settings()
    first = _stored(2)
    later = _stored(3, due=False)
    [[pid]] = side.run("SELECT pg_backend_pid()")
    dropped: list[int] = []

    def on_out(text: str) -> None:
        if _is_summary(text) and not dropped:
            worker = [row[0] for row in side.run(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> %s", pid
            )]  # fmt: skip
            assert connection.connection is not None  # persistent: kept between runs
            assert connection.connection.info.backend_pid in worker
            side.run("SELECT pg_terminate_backend(%s)", connection.connection.info.backend_pid)
            dropped.append(1)
            side.run(f"UPDATE {TABLE} SET next_attempt_at = now()")

    err = StringIO()
    call_command(
        "retry_meter_events",
        "--loop",
        "--interval",
        "0",
        "--runs",
        "3",
        stdout=_Hooked(on_out),
        stderr=err,
    )
    assert dropped
    assert sorted(backend.event_ids()) == sorted(first + later)
    assert "terminating connection" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1


def test_a_single_run_that_fails_on_the_database_exits_non_zero_clearly(
    meter_settings: MeterSettings, side: _Side
) -> None:
    meter_settings()
    side.run(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_away")
    try:
        with pytest.raises(CommandError, match=r"^database error: meter event table \(default\)"):
            call_command("retry_meter_events", stdout=StringIO())
    finally:
        connection.close()
        side.run(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")


def test_loop_ends_with_an_error_when_its_last_run_failed(
    meter_settings: MeterSettings, side: _Side
) -> None:
    meter_settings()
    side.run(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_away")
    err = StringIO()
    try:
        with pytest.raises(CommandError, match="last run failed on the database"):
            call_command(
                "retry_meter_events", "--loop", "--interval", "0", "--runs", "2",
                stdout=StringIO(), stderr=err,
            )  # fmt: skip
    finally:
        connection.close()
        side.run(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")
    assert err.getvalue().count("run failed") == 2


def test_ctrl_c_stops_the_loop_quietly(meter_settings: MeterSettings, backend: DevServer) -> None:
    meter_settings()
    _stored(1)

    def on_out(text: str) -> None:
        if _is_summary(text):  # then the loop sleeps: Ctrl-C comes in meanwhile
            # (to the main thread itself: a SIGINT the kernel gives another thread of the
            # process does not cut the loop's sleep short)
            main = threading.main_thread().ident
            assert main is not None
            threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()

    out = _Hooked(on_out)
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, however pytest was started (a
    # shell's background job starts with SIGINT ignored, and Python then keeps it so)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        call_command("retry_meter_events", "--loop", "--interval", "30", stdout=out)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out.getvalue().rstrip().endswith("stopped")
    assert len(backend.event_ids()) == 1


# -- 2. the admin on METER["DATABASE"] without a router ----------------------------------


@pytest.fixture
def meter_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A second database alias, "meter" (SQLite), with the FailedMeterEvent table, and no
    database router: what METER["DATABASE"] = "meter" alone asks for."""
    configured = connections.configure_settings(
        {
            "default": connections.settings["default"],
            "meter": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path / "m.sqlite3"),
                "CONN_MAX_AGE": None,  # one connection for the test (see below)
            },
        }
    )
    monkeypatch.setitem(connections.settings, "meter", configured["meter"])
    # The test case allows only the databases it knows at its start to connect; this
    # one is connected here, once, and stays so (CONN_MAX_AGE None) through the requests.
    connections["meter"].connect()
    call_command("migrate", "meter_django", database="meter", verbosity=0)
    yield "meter"
    connections["meter"].close()
    del connections["meter"]


def test_admin_reads_and_acts_on_the_meter_database_without_a_router(
    admin_client: Client, meter_settings: MeterSettings, backend: DevServer, meter_db: str
) -> None:
    meter_settings(DATABASE=meter_db)
    retried, discarded, kept = _stored(3, using=meter_db)
    assert not FailedMeterEvent.objects.exists()  # the default database has none
    url = reverse(CHANGELIST)
    page = admin_client.get(url).content.decode()
    for event_id in (retried, discarded, kept):
        assert event_id in page
    assert "?last_error=backend+down" in page  # the last-error filter offers it
    assert kept in admin_client.get(url, {"tenant_id": "t2"}).content.decode()
    rows = FailedMeterEvent.objects.using(meter_db)
    pk = {str(r.event_id): r.pk for r in rows}
    detail = admin_client.get(
        reverse("admin:meter_django_failedmeterevent_change", args=[pk[kept]])
    )
    assert detail.status_code == 200 and kept in detail.content.decode()

    def act(action: str, event_id: str) -> str:
        data = {"action": action, "_selected_action": [str(pk[event_id])]}
        return str(admin_client.post(url, data, follow=True).content.decode())

    assert "1 delivered, 0 failed" in act("retry_now", retried)
    assert "Discarded 1 event." in act("discard", discarded)
    assert backend.event_ids() == [retried]
    statuses = {str(k): v for k, v in rows.values_list("event_id", "status")}
    assert statuses == {retried: "delivered", discarded: "discarded", kept: "failed"}


class OnlyOnMeter:
    """A router that keeps meter_django's tables on a "meter" database."""

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return db == "meter" if app_label == "meter_django" else None


def test_check_reports_a_router_that_keeps_the_table_off_the_meter_database(
    settings: Any,
) -> None:
    assert check_settings() == []  # no router: nothing to say
    settings.DATABASE_ROUTERS = [f"{__name__}.OnlyOnMeter"]
    [message] = check_settings()  # METER["DATABASE"] is still "default"
    assert message.id == "meter_django.E009"
    assert "do not migrate" in message.msg and "'default'" in message.msg


# -- 3. "retry now" under ATOMIC_REQUESTS ------------------------------------------------


class ExplodingStorage(FallbackStorage):
    """Message storage that fails on the action's report: an error in the request after
    the events were sent (any later code of the request could fail alike)."""

    def add(self, level: int, message: Any, extra_tags: str = "") -> None:
        if "delivered" in str(message):
            raise RuntimeError("the request fails after the resend")
        super().add(level, message, extra_tags)


@pytest.fixture
def atomic_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)


def test_retry_now_keeps_its_marks_when_the_request_fails_later(
    admin_client: Client,
    meter_settings: MeterSettings,
    backend: DevServer,
    settings: Any,
    atomic_requests: None,
) -> None:
    meter_settings()
    [event_id] = _stored(1)
    pk = FailedMeterEvent.objects.get().pk
    settings.MESSAGE_STORAGE = f"{__name__}.ExplodingStorage"
    with pytest.raises(RuntimeError, match="fails after the resend"):
        admin_client.post(
            reverse(CHANGELIST), {"action": "retry_now", "_selected_action": [str(pk)]}
        )
    assert backend.event_ids() == [event_id]
    # sent, so recorded as delivered: a rollback with the request would resend it
    assert FailedMeterEvent.objects.get().status == "delivered"
    assert "resent 0 events" in _retry_command()
    assert backend.event_ids() == [event_id]


def test_retry_now_lets_other_writers_in_while_it_sends(
    admin_client: Client,
    meter_settings: MeterSettings,
    backend: DevServer,
    atomic_requests: None,
) -> None:
    """While the selected events are on the wire, the claim is committed: another
    worker sees them leased (on SQLite, the write lock is not held meanwhile)."""
    meter_settings()
    _stored(1)
    pk = FailedMeterEvent.objects.get().pk
    backend.set_fault("slow", delay=0.6)
    seen: list[Any] = []

    def watch() -> None:
        try:
            threading.Event().wait(0.3)  # the send is under way
            row = FailedMeterEvent.objects.values("claim_token", "status").get()
            seen.append(row)
            # a writer (a request storing its event, say) is not kept waiting
            DatabaseFailureStore().store([UsageEvent("x", "tests", "page.processed.basic", 1)])
            seen.append("stored")
        except Exception as exc:  # reported by the test
            seen.append(exc)
        finally:
            connections.close_all()

    watcher = threading.Thread(target=watch)
    watcher.start()
    response = admin_client.post(
        reverse(CHANGELIST), {"action": "retry_now", "_selected_action": [str(pk)]}, follow=True
    )
    watcher.join(10)
    assert "1 delivered" in response.content.decode()
    assert seen[0]["claim_token"] != "", seen  # the claim was committed before the send
    assert seen[1] == "stored", seen


def _retry_command() -> str:
    out = StringIO()
    call_command("retry_meter_events", stdout=out)
    return out.getvalue()


# -- 4. durable mode: the table unavailable once the response is decided ----------------


@pytest.mark.parametrize("stack", ["wsgi", "stream", "asgi"])
def test_a_durable_write_that_fails_after_the_response_sends_the_usage_from_memory(
    meter_settings: MeterSettings, backend: DevServer, side: _Side, settings: Any, stack: str
) -> None:
    """The table is gone while requests are metered (here renamed, as a database restart
    or a botched migration makes it unavailable): the responses are decided, nobody can
    be told, so their events are queued in memory and sent (before: logged and lost).
    record_usage() from application code still raises StoreError."""
    settings.ROOT_URLCONF = "tests.django_app.urls_transactions_async"
    meter_settings(
        DURABLE=True,
        TENANT={"header": "X-Tenant", "trusted": True},
        RULES={"/plain/": "report.generated.small", "/async-plain/": "report.generated.small",
               "/stream/": "report.generated.large"},
    )  # fmt: skip
    headers = {"X-Tenant": "acme"}
    side.run(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_away")
    try:
        for _ in range(3):
            if stack == "wsgi":
                assert Client().get("/plain/", headers=headers).status_code == 200
            elif stack == "stream":
                response = Client().get("/stream/", headers=headers)
                assert b"".join(response.streaming_content) == b"chunk\n" * 3
            else:
                response = aget("/async-plain/", headers=headers)
                assert response.status_code == 200
        expected = {
            "wsgi": [("report.generated.small", 1)] * 3,
            # (each add() to request.meter while the body streams is an event of its own)
            "stream": [*[("page.processed.basic", 1)] * 3, ("report.generated.large", 1)] * 3,
            "asgi": [("report.generated.small", 1)] * 3,
        }[stack]
        wait_for(lambda: len(backend.values()) >= len(expected), timeout=5)
        assert sorted((v["meter_id"], v["total_usage"]) for v in backend.values()) == sorted(
            expected
        )
        assert {v["tenant_id"] for v in backend.values()} == {"acme"}
        with pytest.raises(StoreError, match="meter event table"):
            record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    finally:
        side.run(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")
    assert get_client().flush(5)
    assert get_client().stats()["failed_in_memory"] == 0


@meter("report.generated.small")
def _metered_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


def test_a_durable_write_that_fails_inside_the_callers_transaction_is_not_held_in_memory(
    meter_settings: MeterSettings, backend: DevServer, side: _Side
) -> None:
    """A metered view called inside the caller's transaction on the table's database
    (the outbox): a store write that fails there is that transaction's, and the event
    must not be held in memory, or it would be billed although the work rolled back."""
    meter_settings(DURABLE=True, TENANT={"header": "X-Tenant", "trusted": True})
    get_client()
    side.run(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_away")
    try:
        request = RequestFactory().get("/x/", headers={"X-Tenant": "acme"})
        with contextlib.suppress(_RolledBack), transaction.atomic():
            _metered_view(request)
            raise _RolledBack  # the work is undone
        get_client().flush(2)
        assert backend.values() == []
        assert get_client().stats()["failed_in_memory"] == 0
    finally:
        side.run(f"ALTER TABLE {TABLE}_away RENAME TO {TABLE}")


class _RolledBack(Exception):
    pass


def test_loop_resends_at_once_what_its_failed_runs_pushed_back_once_the_backend_is_back(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    # Each run during an outage put the events 2 minutes out: a worker left them there
    # 2 minutes after the backend was back.
    meter_settings()
    pushed = _stored(2)
    backend.set_fault("down")
    fresh: list[str] = []

    def on_out(text: str) -> None:
        if _is_summary(text) and not fresh:  # the first run failed them: recovery
            backend.clear_fault()
            fresh.extend(_stored(1))

    out = _Hooked(on_out)
    call_command("retry_meter_events", "--loop", "--interval", "0.5", "--runs", "3", stdout=out)
    assert sorted(backend.event_ids()) == sorted(pushed + fresh)
    assert (
        "the backend takes events again: 2 events waiting for their next attempt made "
        "due now" in out.getvalue()
    )
