"""Outage -> events stored in the database -> retry_meter_events -> delivered once."""

from __future__ import annotations

import re
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from meter_core import MemoryTransport, UsageEvent
from meter_core.devserver import DevServer
from meter_django import get_client, record_usage
from meter_django.models import FailedMeterEvent
from meter_django.store import DatabaseFailureStore
from tests.django_app.conftest import MeterSettings

pytestmark = pytest.mark.django_db(transaction=True)


def _record(n: int, tenant: str = "acme") -> list[str]:
    return [
        record_usage(tenant_id=tenant, meter_id="page.processed.basic", total_usage=i + 1)
        for i in range(n)
    ]


def _run(*args: Any, **options: Any) -> str:
    out = StringIO()
    call_command("retry_meter_events", *args, stdout=out, **options)
    return out.getvalue()


def _stored(n: int, **kwargs: Any) -> list[str]:
    events = [UsageEvent("acme", "tests", "page.processed.basic", 1) for _ in range(n)]
    DatabaseFailureStore().store(events, error="backend down", attempts=2, **kwargs)
    return [e.event_id for e in events]


def test_events_of_an_outage_are_stored_then_resent_exactly_once(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    backend.set_fault("down")
    ids = _record(5)
    assert get_client().flush(10)
    rows = FailedMeterEvent.objects.all()
    assert {str(r.event_id) for r in rows} == set(ids)
    assert {r.status for r in rows} == {"failed"}
    assert backend.event_ids() == []

    backend.clear_fault()
    out = _run()
    assert "5 delivered, 0 failed" in out
    assert sorted(backend.event_ids()) == sorted(ids)  # each exactly once
    assert set(FailedMeterEvent.objects.values_list("status", flat=True)) == {"delivered"}
    assert "0 delivered" in _run()  # nothing left to send: no second copy


def test_events_for_a_closed_port_land_in_the_database(
    meter_settings: MeterSettings, backend: DevServer, closed_port_url: str
) -> None:
    meter_settings(KAFKA_URL=closed_port_url, INTERNAL_URL=closed_port_url, MAX_RETRIES=0)
    ids = _record(3)
    assert get_client().flush(10)
    assert sorted(str(i) for i in FailedMeterEvent.objects.values_list("event_id", flat=True)) == (
        sorted(ids)
    )
    meter_settings()  # the backend is reachable again
    assert "3 delivered" in _run()
    assert sorted(backend.event_ids()) == sorted(ids)


def test_failures_exit_non_zero_and_back_off(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    ids = _stored(2)
    backend.set_fault("down")
    with pytest.raises(CommandError, match="2 events are still failed"):
        _run()
    rows = list(FailedMeterEvent.objects.all())
    assert {r.attempts for r in rows} == {3}
    assert all(r.next_attempt_at.timestamp() > time.time() + 10 for r in rows)
    backend.clear_fault()
    out = _run()
    assert "resent 0 events" in out  # not due yet: only the command's failures back off
    # ... which the run says, and how to resend them at once (the backend is back)
    assert "2 events still owed\n  2 of them not due yet (the next in " in out
    assert "--now resends them at once" in out
    assert backend.event_ids() == []
    assert set(ids) == {str(r.event_id) for r in rows}
    out = _run("--now")
    assert "2 events waiting for their next attempt made due now" in out
    assert "2 delivered, 0 failed" in out and "not due yet" not in out
    assert sorted(backend.event_ids()) == sorted(ids)


def test_dry_run_sends_and_changes_nothing(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    _stored(3)
    out = _run("--dry-run")
    assert "would resend 3 events" in out
    assert backend.produce_requests == 0
    assert set(FailedMeterEvent.objects.values_list("status", flat=True)) == {"failed"}
    assert set(FailedMeterEvent.objects.values_list("claim_token", flat=True)) == {""}
    assert "3 delivered" in _run()


def test_filters_limit_and_batches(meter_settings: MeterSettings, backend: DevServer) -> None:
    meter_settings()
    _stored(5)
    other = UsageEvent("globex", "tests", "report.generated.small", 1)
    DatabaseFailureStore().store([other], error="x")
    assert "1 delivered" in _run("--tenant", "globex")
    assert backend.event_ids() == [other.event_id]
    assert "0 delivered" in _run("--meter", "report.generated.small")
    out = _run("--limit", "3", "--batch-size", "2")
    assert "3 delivered" in out and "(2 requests)" in out
    looped = _run("--loop", "--interval", "0", "--runs", "2")
    assert "2 delivered" in looped
    # each run of a worker says when it ran
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d resent", looped, re.M), looped
    assert len(set(backend.event_ids())) == len(backend.event_ids()) == 6


def test_refuses_when_metering_is_disabled(settings: Any) -> None:
    settings.METER = {"ENABLED": False, "DEVICE_ID": "tests"}
    _stored(1)
    with pytest.raises(CommandError, match="disabled"):
        _run()
    with pytest.raises(CommandError, match="at least 1"):
        _run("--limit", "0")


@pytest.mark.parametrize("interval", ["-1", "nan", "inf", "86401"])
def test_refuses_an_interval_the_loop_could_not_sleep(interval: str) -> None:
    _stored(1)
    with pytest.raises(
        CommandError, match=f"--interval must be from 0 to 86400 seconds, got {interval}"
    ):
        _run("--loop", "--interval", interval, "--runs", "2")
    assert FailedMeterEvent.objects.get().status == "failed"  # nothing claimed


@pytest.mark.parametrize("transport", ["log", "memory"])
def test_refuses_a_transport_that_sends_nothing(settings: Any, transport: str) -> None:
    settings.METER = {"TRANSPORT": transport, "DEVICE_ID": "tests"}
    ids = _stored(2)
    for args in ((), ("--dry-run",)):
        with pytest.raises(CommandError, match=f"TRANSPORT.*{transport}.*sends nothing"):
            _run(*args)
    rows = list(FailedMeterEvent.objects.all())
    assert {str(r.event_id) for r in rows} == set(ids)
    assert {(r.status, r.attempts, r.claim_token) for r in rows} == {("failed", 2, "")}


def test_a_transport_object_from_code_is_used_to_resend(settings: Any) -> None:
    transport = MemoryTransport()
    settings.METER = {"TRANSPORT": transport, "DEVICE_ID": "tests"}
    ids = _stored(2)
    assert "2 delivered" in _run()
    assert sorted(v["event_id"] for v in transport.values()) == sorted(ids)
    assert set(FailedMeterEvent.objects.values_list("status", flat=True)) == {"delivered"}


@pytest.mark.usefixtures("quick_recovery")
def test_rows_of_an_outage_are_resent_by_the_app_once_its_fresh_events_go_through(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    # Without a retry_meter_events cron, a row waited in the table for ever
    meter_settings()
    backend.set_fault("down")
    ids = _record(3)
    assert get_client().flush(10)
    assert FailedMeterEvent.objects.filter(status="failed").count() == 3
    backend.clear_fault()
    ids += _record(1)
    assert get_client().flush(10)
    deadline = time.monotonic() + 10
    while FailedMeterEvent.objects.filter(status="failed").exists():
        assert time.monotonic() < deadline, "the rows were not resent"
        time.sleep(0.05)
    assert sorted(backend.event_ids()) == sorted(ids)
    assert set(FailedMeterEvent.objects.values_list("status", flat=True)) == {"delivered"}
