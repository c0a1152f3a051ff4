"""@meter on view methods (class-based views, DRF APIViews), and what it remembers for
the system checks."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.http import HttpResponse
from django.test import AsyncClient, Client
from django.views import View
from rest_framework.authtoken.models import Token

from meter_core import ConfigurationError, capture_events
from meter_django import meter
from meter_django.decorators import declared_meters
from tests.django_app.conftest import MeterSettings

TRUSTED = {"header": "X-Tenant", "trusted": True}


@pytest.fixture
def quiet(meter_settings: MeterSettings) -> MeterSettings:
    """METER with a trusted tenant header; events captured, not sent."""

    def apply(**overrides: Any) -> dict[str, Any]:
        return meter_settings(**{"ENABLED": False, "TENANT": TRUSTED, **overrides})

    return apply


def test_decorator_on_the_methods_of_a_class_based_view(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture
) -> None:
    quiet()
    client = Client(headers={"X-Tenant": "acme"})
    with capture_events() as events, caplog.at_level(logging.ERROR, logger="meter"):
        assert client.get("/reports/").status_code == 200
        assert client.post("/reports/").status_code == 200
        assert client.get("/reports/", {"status": "404"}).status_code == 404
        assert client.head("/reports/").status_code == 200
    assert [(e.tenant_id, e.meter_id, e.total_usage) for e in events] == [
        ("acme", "report.generated.small", 1),
        ("acme", "report.generated.medium", 2),
    ]
    assert caplog.text == ""


def test_decorator_on_the_method_of_an_async_class_based_view(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        response = async_to_sync(AsyncClient().get)("/reports-async/", headers={"X-Tenant": "a"})
    assert response.status_code == 200
    assert [(e.meter_id, e.total_usage) for e in events] == [("report.generated.large", 4)]


def test_decorator_through_method_decorator_on_dispatch(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        assert Client().get("/reports-dispatch/", headers={"X-Tenant": "a"}).status_code == 200
    assert [(e.meter_id, e.total_usage) for e in events] == [("template.processed.large", 1)]


@pytest.mark.django_db
def test_decorator_on_the_method_of_a_drf_api_view(
    quiet: MeterSettings, django_capture_on_commit_callbacks: Any
) -> None:
    quiet(TENANT={"user_attr": "username"})
    token = Token.objects.create(user=User.objects.create_user("umbrella"))
    client = Client()
    with capture_events() as events, django_capture_on_commit_callbacks(execute=True):
        assert client.get("/api/reports/").status_code == 401
        response = client.get(
            "/api/reports/", {"page": "1"}, headers={"Authorization": f"Token {token.key}"}
        )
    assert response.status_code == 200
    # the usage callable saw DRF's Response (3 rows) and Request (1 query parameter); the
    # tenant is the token's user
    assert [(e.tenant_id, e.meter_id, e.total_usage) for e in events] == [
        ("umbrella", "report.generated.dataquery", 4)
    ]


def test_decorated_method_records_by_itself_without_the_middleware(
    quiet: MeterSettings, settings: Any
) -> None:
    quiet()
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "MeterMiddleware" not in m]
    with capture_events() as events:
        response = Client().get("/reports/", headers={"X-Tenant": "acme"})
    assert response.status_code == 200
    assert not hasattr(response.wsgi_request, "meter")
    assert [(e.tenant_id, e.meter_id) for e in events] == [("acme", "report.generated.small")]


def test_decorating_a_class_fails_at_once_and_points_to_method_decorator() -> None:
    with pytest.raises(ConfigurationError, match="method_decorator"):

        @meter("report.generated.small")
        class Whole(View):
            pass


def test_a_view_called_without_a_request_is_served_and_not_metered(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture
) -> None:
    quiet()

    @meter("report.generated.small")
    def odd(first: str, second: str) -> HttpResponse:
        return HttpResponse(first + second)

    with capture_events() as events, caplog.at_level(logging.ERROR, logger="meter"):
        assert odd("a", "b").content == b"ab"
    assert list(events) == []
    assert "no HttpRequest" in caplog.text


def test_malformed_meter_id_or_usage_raises_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="meter_id"):
        meter("")
    with pytest.raises(ConfigurationError, match="usage"):
        meter("report.generated.small", usage=-1)


def test_decorated_meter_ids_are_remembered_with_their_views() -> None:
    declared = declared_meters()
    assert "tests.django_app.views.ReportView.get" in declared["report.generated.small"]
    assert "tests.django_app.views.decorated" in declared["page.processed.advanced"]
    # method_decorator decorates at each request: the id is known from the start
    assert "template.processed.large" in declared
