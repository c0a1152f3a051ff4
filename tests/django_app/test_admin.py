"""The admin of FailedMeterEvent: list, filters, search, read-only detail, actions."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from meter_core import UsageEvent
from meter_core.devserver import DevServer
from meter_django.models import FailedMeterEvent
from meter_django.store import DatabaseFailureStore
from tests.django_app.conftest import MeterSettings

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "sk-live-very-secret-key"
CHANGELIST = "admin:meter_django_failedmeterevent_changelist"


def _stored(*tenants: str) -> list[str]:
    events = [UsageEvent(t, "tests", "page.processed.basic", 2) for t in tenants]
    DatabaseFailureStore().store(events, error="backend down: 503", attempts=6)
    return [e.event_id for e in events]


def _action(client: Client, action: str, ids: list[str]) -> Any:
    pks = FailedMeterEvent.objects.filter(event_id__in=ids).values_list("pk", flat=True)
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [str(pk) for pk in pks]},
        follow=True,
    )


def test_changelist_filters_search_and_detail_never_show_the_api_key(
    admin_client: Client, meter_settings: MeterSettings
) -> None:
    meter_settings(API_KEY=SECRET, PORTAL_URL="http://portal.invalid")
    acme, globex = _stored("acme", "globex")
    url = reverse(CHANGELIST)
    page = admin_client.get(url).content.decode()
    assert acme in page and globex in page
    assert "backend down: 503" in page  # the error filter
    filtered = admin_client.get(url, {"tenant_id": "globex"}).content.decode()
    assert globex in filtered and acme not in filtered
    assert acme in admin_client.get(url, {"q": acme}).content.decode()
    assert globex in admin_client.get(url, {"status": "failed"}).content.decode()
    pk = FailedMeterEvent.objects.get(event_id=acme).pk
    detail = admin_client.get(reverse("admin:meter_django_failedmeterevent_change", args=[pk]))
    body = detail.content.decode()
    assert detail.status_code == 200
    assert "&quot;total_usage&quot;: 2" in body  # the payload, read-only
    assert 'name="tenant_id"' not in body  # no editable field
    for text in (page, filtered, body):
        assert SECRET not in text


def test_retry_now_resends_the_selected_events(
    admin_client: Client, meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    chosen, other = _stored("acme", "acme")
    FailedMeterEvent.objects.update(next_attempt_at="2999-01-01T00:00:00Z")  # not due
    response = _action(admin_client, "retry_now", [chosen])
    assert "1 delivered, 0 failed" in response.content.decode()
    assert backend.event_ids() == [chosen]
    statuses = dict(FailedMeterEvent.objects.values_list("event_id", "status"))
    assert {str(k): v for k, v in statuses.items()} == {chosen: "delivered", other: "failed"}


def test_retry_now_reports_failures(
    admin_client: Client, meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    [event_id] = _stored("acme")
    backend.set_fault("down")
    response = _action(admin_client, "retry_now", [event_id])
    assert "0 delivered, 1 failed" in response.content.decode()
    assert FailedMeterEvent.objects.get().attempts == 7


def test_discard_gives_up_on_the_selected_events(
    admin_client: Client, meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings()
    dropped, kept = _stored("acme", "acme")
    response = _action(admin_client, "discard", [dropped])
    assert "Discarded 1 event." in response.content.decode()
    assert FailedMeterEvent.objects.get(event_id=dropped).status == "discarded"
    assert [s.event.event_id for s in DatabaseFailureStore().claim(10)] == [kept]
    again = _action(admin_client, "discard", [dropped]).content.decode()
    assert "Nothing discarded" in again and "Discarded 0" not in again


def test_no_adding_rows_by_hand(admin_client: Client) -> None:
    response = admin_client.get(reverse("admin:meter_django_failedmeterevent_add"))
    assert response.status_code == 403


def test_retry_now_refuses_a_selection_too_large_for_one_request(
    admin_client: Client,
    meter_settings: MeterSettings,
    backend: DevServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meter_django import admin as meter_admin

    meter_settings()
    monkeypatch.setattr(meter_admin, "MAX_RETRY_NOW", 2)
    ids = _stored("acme", "acme", "acme")
    response = _action(admin_client, "retry_now", ids)
    assert "retry_meter_events" in response.content.decode()
    assert backend.event_ids() == []  # nothing half-done
    assert set(FailedMeterEvent.objects.values_list("status", flat=True)) == {"failed"}


def test_discard_leaves_alone_events_a_sender_has_on_the_wire(
    admin_client: Client, meter_settings: MeterSettings
) -> None:
    meter_settings()
    on_the_wire, idle = _stored("acme", "acme")
    assert len(DatabaseFailureStore().only([on_the_wire]).claim(5, lease_seconds=60)) == 1
    response = _action(admin_client, "discard", [on_the_wire, idle]).content.decode()
    assert "Discarded 1 event; 1 is being sent right now" in response
    statuses = dict(FailedMeterEvent.objects.values_list("event_id", "status"))
    assert {str(k): v for k, v in statuses.items()} == {on_the_wire: "failed", idle: "discarded"}


def test_a_user_who_may_only_view_gets_no_actions(
    client: Client, meter_settings: MeterSettings, backend: DevServer
) -> None:
    from django.contrib.auth.models import Permission, User

    meter_settings()
    [event_id] = _stored("acme")
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_failedmeterevent"))
    client.force_login(viewer)
    page = client.get(reverse(CHANGELIST))
    assert page.status_code == 200 and event_id in page.content.decode()
    body = page.content.decode()
    assert 'value="retry_now"' not in body and 'value="discard"' not in body
    for action in ("retry_now", "discard"):
        _action(client, action, [event_id])
    assert FailedMeterEvent.objects.get().status == "failed"  # untouched
    assert backend.event_ids() == []


def test_owed_events_cannot_be_deleted_done_ones_can(
    admin_client: Client, meter_settings: MeterSettings
) -> None:
    meter_settings()
    owed, done = _stored("acme", "acme")
    DatabaseFailureStore().mark_delivered([done])
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "delete_selected" not in page  # no bulk delete: it cannot tell owed rows
    pk = {str(e): pk for e, pk in FailedMeterEvent.objects.values_list("event_id", "pk")}
    delete = "admin:meter_django_failedmeterevent_delete"
    assert admin_client.post(reverse(delete, args=[pk[owed]]), {"post": "yes"}).status_code == 403
    assert admin_client.post(reverse(delete, args=[pk[done]]), {"post": "yes"}).status_code == 302
    assert [str(e) for e in FailedMeterEvent.objects.values_list("event_id", flat=True)] == [owed]


def test_an_event_id_is_searched_through_its_index_and_tenants_by_any_value(
    admin_client: Client, meter_settings: MeterSettings
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    meter_settings()
    acme, globex = _stored("acme", "globex")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse(CHANGELIST), {"q": f" {acme} "}).content.decode()
    assert acme in page and globex not in page
    assert not any("UPPER(" in q["sql"] for q in queries.captured_queries)
    filtered = admin_client.get(reverse(CHANGELIST), {"tenant_id": "globex"}).content.decode()
    assert globex in filtered and acme not in filtered
    # also when no owed event has it (the filter's sidebar then lists nothing)
    DatabaseFailureStore().mark_delivered([acme, globex])
    done = admin_client.get(reverse(CHANGELIST), {"tenant_id": "globex"}).content.decode()
    assert globex in done and acme not in done
    # a tenant id shaped like a UUID is still found by search
    [tenant] = _stored("6f1c2b8e-0d3a-4c55-9e71-2b5d8a7c9f10")
    page = admin_client.get(reverse(CHANGELIST), {"q": "6f1c2b8e-0d3a-4c55-9e71-2b5d8a7c9f10"})
    assert tenant in page.content.decode()
