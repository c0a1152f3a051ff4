"""@meter on view methods (class-based views, DRF APIViews), and what it remembers for
the system checks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.http import HttpResponse
from django.test import Client, RequestFactory
from django.views import View
from rest_framework.authtoken.models import Token

from meter_core import ConfigurationError, LogThrottle, RequestUsage, capture_events
from meter_django import decorators, meter
from meter_django.decorators import declared_meters
from tests.django_app.conftest import MeterSettings, aget

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
        response = aget("/reports-async/", headers={"X-Tenant": "a"})
    assert response.status_code == 200
    assert [(e.meter_id, e.total_usage) for e in events] == [("report.generated.large", 4)]


def test_decorator_through_method_decorator_on_dispatch(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        assert Client().get("/reports-dispatch/", headers={"X-Tenant": "a"}).status_code == 200
    assert [(e.meter_id, e.total_usage) for e in events] == [("template.processed.large", 1)]


def test_decorator_through_method_decorator_on_the_dispatch_of_an_async_view(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # (dispatch() of an async class-based view is a sync method returning a coroutine)
    quiet()
    with capture_events() as events, caplog.at_level(logging.ERROR, logger="meter"):
        response = aget("/reports-dispatch-async/", headers={"X-Tenant": "a"})
    assert response.status_code == 200 and response.content == b"async dispatch"
    assert [(e.tenant_id, e.meter_id, e.total_usage) for e in events] == [
        ("a", "template.processed.medium", 6)
    ]
    assert caplog.text == ""


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("middleware", [True, False])
def test_a_usage_callable_of_an_async_view_may_use_the_orm(
    quiet: MeterSettings, settings: Any, caplog: pytest.LogCaptureFixture, middleware: bool
) -> None:
    quiet()
    if not middleware:  # the decorator records by itself
        settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "MeterMiddleware" not in m]
    User.objects.create(username="u1")
    with capture_events() as events, caplog.at_level(logging.ERROR, logger="meter"):
        response = aget("/decorated-async-counting/", headers={"X-Tenant": "a"})
    assert response.status_code == 200
    assert [(e.meter_id, e.total_usage) for e in events] == [("rule.executed.medium", 2)]
    assert caplog.text == ""


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
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fresh rate limiter: an earlier test may have used up this process's ERROR line
    monkeypatch.setattr(decorators, "_no_request", LogThrottle(decorators.logger))
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


def _error_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage()]


def _throttled(
    caplog: pytest.LogCaptureFixture,
    call: Callable[[], object],
    message: str,
    n: int = 20,
    *,
    traceback: bool = True,
) -> None:
    """Call ``n`` times, then once more once the 0.5 s interval is over: the ERROR line
    ``message`` is logged once, then once more with the count (each with the traceback
    of the failure, when there is one)."""
    with caplog.at_level(logging.DEBUG, logger="meter"):
        for _ in range(n):
            call()
        [first] = _error_lines(caplog, message)
        time.sleep(max(0.0, first.created + 0.55 - time.time()))
        call()
    _, second = _error_lines(caplog, message)
    assert (first.exc_info is not None) is traceback
    assert (second.exc_info is not None) is traceback
    assert f"({n} times in the last 0.5s)" in second.getMessage()


def test_a_view_called_without_a_request_logs_one_line_per_interval(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decorators, "_no_request", LogThrottle(decorators.logger, 0.5))
    quiet()

    @meter("report.generated.small")
    def odd(first: str, second: str) -> HttpResponse:
        return HttpResponse(first + second)

    with capture_events() as events:
        _throttled(
            caplog,
            lambda: odd("a", "b"),
            "@meter('report.generated.small'): the view",
            traceback=False,
        )
    assert list(events) == []


def test_metering_errors_of_a_view_log_one_line_per_interval_not_a_traceback_each(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decorators, "_metering_failed", LogThrottle(decorators.logger, 0.5))
    monkeypatch.setattr(decorators, "_declared", {})  # forget it after the test (E012)
    quiet()

    # a meter id not in the catalog (system check meter_django.E012): request.meter
    # refuses it at every request
    @meter("no.such.meter")
    def view(request: Any) -> HttpResponse:
        return HttpResponse("ok")

    def call() -> None:
        request = RequestFactory().get("/unknown/")
        request.meter = RequestUsage()  # type: ignore[attr-defined]
        assert view(request).status_code == 200

    with capture_events() as events:
        _throttled(
            caplog,
            call,
            "metering of 'no.such.meter' failed; the response is unaffected: InvalidEvent: ",
        )
    assert list(events) == []
    traces = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(traces) == 19 and all(r.name == "meter.django" for r in traces)
