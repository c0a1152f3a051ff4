"""Events of a tenant without a customer account: what retry_meter_events says of them,
and discard_meter_events giving up on them."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command, load_command_class

from meter_core import UsageEvent
from meter_core.devserver import DevServer
from meter_django.models import FailedMeterEvent
from meter_django.store import DatabaseFailureStore
from tests.django_app.conftest import MeterSettings

pytestmark = pytest.mark.django_db(transaction=True)


def _call(name: str, *args: Any) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


def _stored(tenant: str, n: int, meter: str = "page.processed.basic") -> list[str]:
    events = [UsageEvent(tenant, "tests", meter, 1) for _ in range(n)]
    DatabaseFailureStore().store(events, error="no customer account", attempts=2)
    return [e.event_id for e in events]


def _statuses() -> dict[str, str]:
    return {str(r.event_id): r.status for r in FailedMeterEvent.objects.all()}


def test_retry_says_what_becomes_of_refused_events_then_discard_gives_up_on_them(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    ghost = _stored("ghost", 2)
    acme = _stored("acme", 3)
    backend.remove_customer("ghost")
    out = StringIO()
    with pytest.raises(CommandError, match="2 events are still failed"):
        call_command("retry_meter_events", stdout=out)
    assert "3 delivered, 2 failed" in out.getvalue()
    assert (
        "2 events refused for good stay owed and are tried again at each run after a "
        "backoff (at most 2 min), in case the tenant's customer account is made; to give "
        "up on a tenant's: manage.py discard_meter_events --tenant TENANT"
    ) in out.getvalue()

    out_text = _call("discard_meter_events", "--tenant", "ghost", "--dry-run")
    assert "would discard 2 owed events of tenant 'ghost'" in out_text
    assert {_statuses()[i] for i in ghost} == {"failed"}
    assert "discarded 2 owed events of tenant 'ghost'" in _call(
        "discard_meter_events", "--tenant", "ghost", "--noinput"
    )
    statuses = _statuses()
    assert {statuses[i] for i in ghost} == {"discarded"}
    assert {statuses[i] for i in acme} == {"delivered"}
    reasons = set(FailedMeterEvent.objects.filter(status="discarded").values_list(
        "last_error", flat=True))  # fmt: skip
    assert reasons == {"no customer account for tenant 'ghost'"}  # (why: still readable)
    out_text = _call("retry_meter_events", "--now")  # nothing owed: exits 0, says nothing more
    assert "refused for good" not in out_text
    assert not set(ghost) & set(backend.event_ids())


def test_discard_keeps_other_meters_tenants_and_leased_events(
    meter_settings: MeterSettings,
) -> None:
    meter_settings()
    pages = _stored("ghost", 3)
    reports = _stored("ghost", 1, meter="report.generated.small")
    other = _stored("acme", 1)
    store = DatabaseFailureStore()
    leased = store.claim(1, tenant_id="ghost", meter_id="page.processed.basic")
    out_text = _call(
        "discard_meter_events", "--tenant", "ghost", "--meter", "page.processed.basic",
        "--no-input",
    )  # fmt: skip
    assert "discarded 2 owed events of tenant 'ghost', meter 'page.processed.basic'" in out_text
    statuses = _statuses()
    assert statuses[leased[0].event.event_id] == "failed"  # a sender has it: left alone
    assert sorted(i for i in pages if statuses[i] == "discarded") == sorted(
        set(pages) - {leased[0].event.event_id}
    )
    assert statuses[reports[0]] == statuses[other[0]] == "failed"
    assert "no owed event of tenant 'nobody'" in _call(
        "discard_meter_events", "--tenant", "nobody", "--noinput"
    )


def test_discard_asks_first(meter_settings: MeterSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    meter_settings()
    ids = _stored("ghost", 2)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert "nothing discarded" in _call("discard_meter_events", "--tenant", "ghost")
    assert set(_statuses().values()) == {"failed"}
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    _call("discard_meter_events", "--tenant", "ghost")
    assert {_statuses()[i] for i in ids} == {"discarded"}
    with pytest.raises(CommandError, match="--tenant"):
        call_command("discard_meter_events")

    def no_terminal(prompt: str) -> str:
        raise EOFError

    _stored("ghost", 1)
    monkeypatch.setattr("builtins.input", no_terminal)
    with pytest.raises(CommandError, match="pass --noinput"):
        call_command("discard_meter_events", "--tenant", "ghost")


@pytest.mark.parametrize(
    ("command", "args"),
    [("meter_status", ()), ("purge_meter_events", ()),
     ("discard_meter_events", ("--tenant", "ghost", "--noinput"))],
)  # fmt: skip
def test_table_commands_run_without_the_clients_settings(
    settings: Any, command: str, args: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cron job on a host without METER_KAFKA_URL / METER_DEVICE_ID was stopped by the
    # system checks (E004, E011) though these only read or write the meter table.
    for name in ("METER_KAFKA_URL", "METER_DEVICE_ID", "METER_INTERNAL_URL"):
        monkeypatch.delenv(name, raising=False)
    settings.METER = {"ENABLED": True}
    # as manage.py runs it: the system checks first, when the command requires them
    load_command_class("meter_django", command).run_from_argv(["manage.py", command, *args])


def test_retry_says_what_a_worker_holds(meter_settings: MeterSettings, backend: DevServer) -> None:
    meter_settings()
    _stored("acme", 2)
    assert len(DatabaseFailureStore().claim(1, lease_seconds=600)) == 1
    out = _call("retry_meter_events")
    assert "resent 1 event: 1 delivered" in out
    assert "1 event still owed\n  1 of them is held by a worker" in out
    assert "due again when the lease ends, in 10 min" in out
