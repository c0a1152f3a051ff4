"""record_usage / record_session: validation, transactions, the durable outbox."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from django.db import transaction
from django.test import Client

from meter_core import InvalidEvent, LogThrottle, capture_events
from meter_core.devserver import DevServer
from meter_django import get_client, record_session, record_usage, recording
from meter_django.models import FailedMeterEvent
from meter_django.recording import UNCONFIGURED_DEVICE
from tests.django_app.conftest import MeterSettings, wait_for


def test_recorded_event_reaches_the_backend_with_the_default_device(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    event_id = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=3)
    assert get_client().flush(5)
    [value] = backend.values()
    assert value["event_id"] == event_id
    assert value["device_id"] == "tests"
    assert value["total_usage"] == 3
    assert value["customer_id"] == "cust-acme"


def test_session_event_is_recorded(meter_settings: MeterSettings, backend: DevServer) -> None:
    meter_settings()
    event_id = record_session(
        tenant_id="acme", meter_id="chat.on.time_hours", start_time=1_700_000_000_000
    )
    assert get_client().flush(5)
    [value] = backend.values()
    assert value["event_id"] == event_id
    assert value["ai_event"] is True
    assert value["start_time"] == 1_700_000_000_000


def test_bad_arguments_raise_at_once(meter_settings: MeterSettings) -> None:
    meter_settings()
    with pytest.raises(InvalidEvent, match="meter_id"):
        record_usage(tenant_id="acme", meter_id="document.basic.page", total_usage=1)
    with pytest.raises(InvalidEvent, match="total_usage"):
        record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=-1)
    with pytest.raises(InvalidEvent):
        record_session(tenant_id="acme", meter_id="chat.on.time_hours")


@pytest.mark.django_db(transaction=True)
def test_event_inside_atomic_is_sent_only_after_commit(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    with transaction.atomic():
        event_id = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        time.sleep(0.1)  # several flush intervals: nothing may leave before the commit
        assert get_client().flush(2)
        assert backend.values() == []
    assert get_client().flush(5)
    assert backend.event_ids() == [event_id]


@pytest.mark.django_db(transaction=True)
def test_rolled_back_operation_is_never_billed(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()

    def failing_operation() -> None:
        with transaction.atomic():
            record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
            raise RuntimeError("the operation failed")

    with pytest.raises(RuntimeError):
        failing_operation()
    kept = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=2)
    assert get_client().flush(5)
    assert backend.event_ids() == [kept]


@pytest.mark.django_db
def test_on_commit_callbacks_carry_the_event(
    meter_settings: MeterSettings, django_capture_on_commit_callbacks: Any
) -> None:
    meter_settings(ENABLED=False)
    with capture_events() as events:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            event_id = record_usage(
                tenant_id="acme", meter_id="page.processed.basic", total_usage=1
            )
        assert len(callbacks) == 1
        assert list(events) == []  # not handed over before the commit
        callbacks[0]()
    assert [e.event_id for e in events] == [event_id]


@pytest.mark.django_db(transaction=True)
def test_durable_mode_writes_the_outbox_row_in_the_callers_transaction(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings(DURABLE=True)
    seen: list[str] = []

    def failing_operation() -> None:
        with transaction.atomic():
            lost = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
            row = FailedMeterEvent.objects.get(event_id=lost)
            assert row.status == "queued"
            assert row.payload["event_id"] == lost
            seen.append(lost)
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        failing_operation()
    [lost] = seen
    assert not FailedMeterEvent.objects.filter(event_id=lost).exists()

    with transaction.atomic():
        kept = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=7)
    wait_for(lambda: backend.event_ids() == [kept])
    wait_for(lambda: FailedMeterEvent.objects.get(event_id=kept).status == "delivered")
    assert lost not in backend.event_ids()


@pytest.mark.django_db(transaction=True)
def test_durable_mode_with_a_store_outside_the_database_writes_after_the_commit(
    meter_settings: MeterSettings, backend: DevServer, tmp_path: Any
) -> None:
    # The outbox holds only when the store is the table of the transaction's database: a
    # SQLite spool (or the table on another database) cannot roll back with the caller's
    # work, so the event is written after the commit, as outside durable mode.
    from meter_core import SQLiteSpool

    spool = SQLiteSpool(tmp_path / "spool.db")
    meter_settings(DURABLE=True, STORE=spool)
    seen: list[str] = []

    def failing_operation() -> None:
        with transaction.atomic():
            seen.append(record_usage(tenant_id="acme", meter_id="page.processed.basic",
                                     total_usage=1))  # fmt: skip
            assert spool.pending_count() == 0  # not written before the commit
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        failing_operation()
    [lost] = seen
    with transaction.atomic():
        kept = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=2)
    wait_for(lambda: backend.event_ids() == [kept])
    time.sleep(0.2)
    assert lost not in backend.event_ids() and spool.pending_count() == 0


@pytest.mark.django_db
def test_misconfigured_settings_do_not_break_the_caller_and_keep_the_event(
    settings: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fresh rate limiter: an earlier test may have used up this process's ERROR line
    monkeypatch.setattr(recording, "_unconfigured", LogThrottle(recording.logger))
    settings.METER = {"ENABLED": True, "DEVICE_ID": "tests"}  # no KAFKA_URL
    with caplog.at_level(logging.ERROR, logger="meter.django"):
        event_id = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    assert len(event_id) == 36
    assert "misconfigured" in caplog.text
    row = FailedMeterEvent.objects.get(event_id=event_id)  # kept for retry_meter_events
    assert (row.status, row.meter_id, row.total_usage) == ("failed", "page.processed.basic", 1)
    assert "misconfigured" in row.last_error
    with pytest.raises(InvalidEvent):
        record_usage(tenant_id="acme", meter_id="nope.nope", total_usage=1)


@pytest.mark.django_db(transaction=True)
def test_durable_events_go_out_after_the_commit_at_the_next_poll_in_batches(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings(DURABLE=True, FLUSH_INTERVAL=0.3)
    with transaction.atomic():
        first = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        time.sleep(0.6)  # polls come and go: the row is not committed, nothing is sent
        assert backend.event_ids() == []
    wait_for(lambda: backend.event_ids() == [first], timeout=10)
    # One commit each, in quick succession: they go out together, not one request each
    # (a wake-up per commit made batches of one or two, several times the work per event).
    requests_before = backend.produce_requests
    ids = []
    for n in range(40):  # 0.2 s in all, less than the flush interval
        with transaction.atomic():
            ids.append(record_usage(tenant_id="acme", meter_id="page.processed.basic",
                                    total_usage=n + 1))  # fmt: skip
        time.sleep(0.005)
    wait_for(lambda: len(backend.event_ids()) == 41, timeout=10)
    assert sorted(backend.event_ids()) == sorted([first, *ids])
    assert backend.produce_requests - requests_before <= 5


@pytest.fixture
def fresh_throttles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh rate limiters: an earlier test may have used up this process's ERROR lines."""
    monkeypatch.setattr(recording, "_unconfigured", LogThrottle(recording.logger))
    monkeypatch.setattr(recording, "_no_device", LogThrottle(recording.logger))


@pytest.mark.django_db
def test_usage_without_any_device_id_is_kept_not_raised_nor_lost(
    meter_settings: MeterSettings,
    backend: DevServer,
    fresh_throttles: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: Any,
) -> None:
    monkeypatch.delenv("METER_DEVICE_ID", raising=False)
    meter_settings(DEVICE_ID=None)  # system check meter_django.E011
    with caplog.at_level(logging.ERROR, logger="meter.django"):
        kept = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=2)
        session = record_session(
            tenant_id="acme", meter_id="chat.on.time_hours", start_time=1_700_000_000_000
        )
    assert "no device id" in caplog.text
    rows = {str(row.event_id): row for row in FailedMeterEvent.objects.all()}
    assert set(rows) == {kept, session}
    assert {(r.status, r.device_id) for r in rows.values()} == {("failed", UNCONFIGURED_DEVICE)}
    assert "no device id" in rows[kept].last_error
    # a device id given by the caller needs no configuration: that event is sent
    with django_capture_on_commit_callbacks(execute=True):
        sent = record_usage(
            tenant_id="acme", meter_id="page.processed.basic", total_usage=1, device_id="d1"
        )
    assert get_client().flush(5)
    assert backend.event_ids() == [sent]


@pytest.mark.django_db
def test_usage_through_the_middleware_without_a_device_id_is_kept(
    meter_settings: MeterSettings, fresh_throttles: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METER_DEVICE_ID", raising=False)
    meter_settings(DEVICE_ID=None, TENANT={"header": "X-Tenant", "trusted": True})
    assert Client().get("/self-metered/", headers={"X-Tenant": "acme"}).status_code == 200
    [row] = FailedMeterEvent.objects.all()
    assert (row.tenant_id, row.meter_id, row.total_usage, row.device_id) == (
        "acme", "report.generated.medium", 4, UNCONFIGURED_DEVICE,
    )  # fmt: skip


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("environ", "meter", "device"),
    [
        # another option's bad variable: DEVICE_ID is read alone and still used
        ({"METER_TIMEOUT": "abc"}, {"DEVICE_ID": "web"}, "web"),
        ({"METER_ALLOW_UNKNOWN_METERS": "maybe"}, {"DEVICE_ID": "web"}, "web"),
        # the device id's own variable is bad: the usage is kept all the same
        ({"METER_DEVICE_ID": "bad\tid"}, {}, UNCONFIGURED_DEVICE),
    ],
)
def test_a_bad_environment_variable_never_raises_into_the_view_and_keeps_the_usage(
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    fresh_throttles: None,
    environ: dict[str, str],
    meter: dict[str, Any],
    device: str,
) -> None:
    monkeypatch.delenv("METER_DEVICE_ID", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings.METER = {
        "ENABLED": True,
        "KAFKA_URL": "http://127.0.0.1:9",
        "TENANT": {"header": "X-Tenant", "trusted": True},
        **meter,
    }
    event_id = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    response = Client().get("/self-metered/", headers={"X-Tenant": "acme"})
    assert response.status_code == 200
    rows = list(FailedMeterEvent.objects.order_by("id"))
    assert [(r.meter_id, r.device_id, r.status) for r in rows] == [
        ("page.processed.basic", device, "failed"),
        ("report.generated.medium", device, "failed"),
    ]
    assert str(rows[0].event_id) == event_id
    assert all("misconfigured" in r.last_error for r in rows)
