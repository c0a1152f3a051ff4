"""meter_status and send_test_meter_event."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from meter_core import UsageEvent
from meter_core.devserver import DevServer
from meter_django.models import DISCARDED, FailedMeterEvent
from meter_django.store import DatabaseFailureStore
from tests.django_app.conftest import MeterSettings

SECRET = "sk-live-very-secret-key"


def _call(name: str, *args: str) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out, stderr=out)
    return out.getvalue()


@pytest.mark.django_db
def test_meter_status_counts_by_status_meter_and_reason(meter_settings: MeterSettings) -> None:
    meter_settings(API_KEY=SECRET, PORTAL_URL="http://portal.invalid")
    store = DatabaseFailureStore()
    store.store([UsageEvent("acme", "d", "page.processed.basic", 1) for _ in range(2)])
    store.store([UsageEvent("acme", "d", "report.generated.small", 1)], error="backend down")
    out = _call("meter_status")
    assert "queued     2" in out
    assert "failed     1" in out
    assert "page.processed.basic" in out and "report.generated.small" in out
    assert "1 x failed: backend down" in out
    assert "Due for retry now: 3" in out
    assert "Oldest owed event: " in out
    store.claim(1)  # a worker is sending one: not due for the retry command
    leased = _call("meter_status")
    assert "Due for retry now: 2" in leased and "Being sent (leased by a worker): 1" in leased
    assert "failure store DatabaseFailureStore" in out
    assert SECRET not in out
    for tenant in ("gone-1", "gone-2"):  # reasons that name a tenant: one line for all
        store.store([UsageEvent(tenant, "d", "page.processed.basic", 1)],
                    error=f"no customer account for tenant {tenant!r}")  # fmt: skip
    assert "2 x failed: no customer account for tenant …  (2 tenants)" in _call("meter_status")


def test_send_test_event_succeeds_against_the_backend(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings(API_KEY=SECRET, PORTAL_URL=backend.url)
    out = _call("send_test_meter_event", "--tenant", "acme")
    assert "Delivered: partition 0, offset 0" in out
    assert "API key: set" in out
    assert SECRET not in out
    [value] = backend.values()
    assert (value["tenant_id"], value["total_usage"]) == ("acme", 0)


@pytest.mark.parametrize(
    ("fault", "message"),
    [("down", "unavailable"), ("unknown_tenant", "no customer account"), ("reject", "rejected")],
)
def test_send_test_event_fails_clearly(
    meter_settings: MeterSettings, backend: DevServer, fault: str, message: str
) -> None:
    meter_settings(API_KEY=SECRET, PORTAL_URL=backend.url)
    backend.set_fault(fault)
    with pytest.raises(CommandError, match=message) as info:
        _call("send_test_meter_event", "--tenant", "acme")
    assert SECRET not in str(info.value)
    assert str(info.value).count("no customer account") <= 1  # (it said it twice)


def test_send_test_event_reports_bad_configuration(settings: Any) -> None:
    settings.METER = {"ENABLED": True, "DEVICE_ID": "x"}
    with pytest.raises(CommandError, match="configuration: kafka_url"):
        _call("send_test_meter_event", "--tenant", "acme")
    settings.METER = {"ENABLED": False, "DEVICE_ID": "x"}
    with pytest.raises(CommandError, match="disabled"):
        _call("send_test_meter_event", "--tenant", "acme")


@pytest.mark.django_db
def test_purge_deletes_rows_delivered_long_ago_and_never_owed_ones(
    meter_settings: MeterSettings,
) -> None:
    meter_settings()
    store = DatabaseFailureStore()
    old = [UsageEvent("acme", "d", "page.processed.basic", 1) for _ in range(3)]
    recent = [UsageEvent("acme", "d", "page.processed.basic", 1) for _ in range(2)]
    owed = [UsageEvent("acme", "d", "page.processed.basic", 1) for _ in range(2)]
    discarded = [UsageEvent("acme", "d", "page.processed.basic", 1)]
    store.store(old + recent + owed + discarded, error="backend down")
    store.mark_delivered([e.event_id for e in old + recent])
    FailedMeterEvent.objects.filter(event_id=discarded[0].event_id).update(status=DISCARDED)
    long_ago = timezone.now() - timedelta(days=10)
    FailedMeterEvent.objects.exclude(event_id__in=[e.event_id for e in recent]).update(
        updated_at=long_ago
    )
    assert "would delete 3 rows (delivered)" in _call("purge_meter_events", "--dry-run")
    assert FailedMeterEvent.objects.count() == 8
    assert "deleted 3 rows (delivered, older than 7 days)" in _call("purge_meter_events")
    left = {str(i) for i in FailedMeterEvent.objects.values_list("event_id", flat=True)}
    assert left == {e.event_id for e in recent + owed + discarded}  # owed ones stay, always
    assert "deleted 1 rows" in _call("purge_meter_events", "--discarded")
    assert "deleted 2 rows" in _call("purge_meter_events", "--older-than", "0")
    assert {str(i) for i in FailedMeterEvent.objects.values_list("event_id", flat=True)} == {
        e.event_id for e in owed
    }
    with pytest.raises(CommandError, match="--older-than"):
        _call("purge_meter_events", "--older-than", "soon")
