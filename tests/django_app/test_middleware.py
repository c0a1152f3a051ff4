"""MeterMiddleware and @meter on sync, async and DRF views."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from rest_framework.authtoken.models import Token

from meter_core import LogThrottle, capture_events
from meter_core.devserver import DevServer
from meter_core.events import MAX_USAGE
from meter_django import get_client, metering, middleware
from meter_django.metering import untenanted_count
from meter_django.models import FailedMeterEvent
from tests.django_app.conftest import MeterSettings, aget

TRUSTED = {"header": "X-Tenant", "trusted": True}
RULES = {
    "GET /documents/<int:pk>/scan": {"meter": "page.processed.basic", "header": "X-Pages"},
    "documents:export": "report.generated.large",
    "POST /ok/": "report.generated.small",
    "/failing/": "report.generated.small",
}


@pytest.fixture
def quiet(meter_settings: MeterSettings) -> MeterSettings:
    """METER with rules and a trusted tenant header; events captured, not sent."""

    def apply(**overrides: Any) -> dict[str, Any]:
        return meter_settings(**{"ENABLED": False, "RULES": RULES, "TENANT": TRUSTED, **overrides})

    return apply


def _get(path: str, tenant: str | None = "acme", **extra: Any) -> Any:
    headers = {"X-Tenant": tenant} if tenant else {}
    return Client().get(path, headers=headers, **extra)


def test_route_rule_meters_usage_from_a_header_and_removes_it(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        response = _get("/documents/7/scan", data={"pages": "4"})
    assert response.status_code == 200
    assert "X-Pages" not in response.headers
    [event] = events
    assert (event.tenant_id, event.meter_id, event.total_usage) == (
        "acme",
        "page.processed.basic",
        4,
    )
    assert event.device_id == "tests"


def test_view_name_rule_and_method_restriction(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        _get("/documents/7/export")
        _get("/ok/")  # the /ok/ rule is POST only
        Client().post("/ok/", headers={"X-Tenant": "acme"})
    assert [(e.meter_id, e.total_usage) for e in events] == [
        ("report.generated.large", 1),
        ("report.generated.small", 1),
    ]


@pytest.mark.parametrize(
    ("path", "billed"),
    [
        ("/documents/7/export", ("report.generated.large", 1)),  # a rule without methods
        ("/decorated/", ("page.processed.advanced", 5)),  # @meter
        ("/self-metered/", ("report.generated.medium", 4)),  # request.meter.add() in the view
    ],
)
def test_head_and_options_are_not_billed_without_a_method_named(
    quiet: MeterSettings, path: str, billed: tuple[str, int]
) -> None:
    quiet()
    tenant = {"X-Tenant": "acme"}
    with capture_events() as events:
        # a CORS preflight, an uptime check: the view answers 200, but bills nothing
        preflight = Client().options(path, headers=tenant)
        check = Client().head(path, headers=tenant)
        _get(path)
    assert (preflight.status_code, check.status_code) == (200, 200)
    assert [(e.meter_id, e.total_usage) for e in events] == [billed]


def test_usage_callable_rule(quiet: MeterSettings) -> None:
    quiet(RULES={"/ok/": {"meter": "report.generated.small", "usage": lambda rq, rs: 6}})
    with capture_events() as events:
        _get("/ok/")
    assert [e.total_usage for e in events] == [6]


def test_only_successful_responses_are_metered(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        assert _get("/failing/").status_code == 400
        assert _get("/self-metered/", data={"status": "500"}).status_code == 500
    assert list(events) == []
    quiet(METER_STATUSES=[400])
    with capture_events() as events:
        _get("/failing/")
    assert [e.meter_id for e in events] == ["report.generated.small"]


def test_view_adds_its_own_usage(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        _get("/self-metered/")
    assert [(e.meter_id, e.total_usage) for e in events] == [("report.generated.medium", 4)]


def test_decorator_on_sync_and_async_views(quiet: MeterSettings) -> None:
    quiet()
    with capture_events() as events:
        _get("/decorated/")
        aget("/decorated-async/", headers={"X-Tenant": "acme"})
        aget("/decorated-async/", {"status": "404"}, headers={"X-Tenant": "acme"})
    assert [(e.meter_id, e.total_usage) for e in events] == [
        ("page.processed.advanced", 5),
        ("template.processed.small", 3),
    ]


def test_decorator_records_by_itself_without_the_middleware(
    quiet: MeterSettings, settings: Any
) -> None:
    quiet()
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "MeterMiddleware" not in m]
    with capture_events() as events:
        response = _get("/decorated/")
    assert response.status_code == 200
    assert not hasattr(response.wsgi_request, "meter")
    assert [(e.meter_id, e.total_usage) for e in events] == [("page.processed.advanced", 5)]


def test_async_view_through_the_asgi_stack(
    meter_settings: MeterSettings, backend: DevServer
) -> None:
    meter_settings(TENANT=TRUSTED)
    response = aget("/async/", headers={"X-Tenant": "initech"})
    assert response.status_code == 200
    assert get_client().flush(5)
    [value] = backend.values()
    assert (value["tenant_id"], value["meter_id"], value["total_usage"]) == (
        "initech",
        "report.generated.large",
        2,
    )


def test_forged_tenant_header_is_ignored_unless_trusted(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metering, "_misconfigured", LogThrottle(metering.logger))
    quiet(TENANT={"header": "X-Tenant"})  # not marked trusted: refused
    with capture_events() as events, caplog.at_level(logging.ERROR):
        for _ in range(3):
            assert _get("/self-metered/", tenant="someone-else").status_code == 200
    assert list(events) == []
    # a setting the system checks report: one line (no traceback), not one per request
    [logged] = [r for r in caplog.records if "not marked trusted" in r.getMessage()]
    assert logged.exc_info is None and "manage.py check" in logged.getMessage()
    quiet(TENANT=TRUSTED)
    with capture_events() as events:
        _get("/self-metered/", tenant="globex")
    assert [e.tenant_id for e in events] == ["globex"]


def test_requests_without_a_tenant_are_counted_not_metered(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture
) -> None:
    quiet()
    before = untenanted_count()
    with capture_events() as events, caplog.at_level(logging.WARNING):
        _get("/self-metered/", tenant=None)
        _get("/documents/1/export", tenant=None)
    assert list(events) == []
    assert untenanted_count() == before + 2
    assert caplog.text.count("no tenant") <= 1  # rate limited


def test_tenant_from_a_callable(quiet: MeterSettings) -> None:
    quiet(TENANT=lambda request: request.GET.get("t"))
    with capture_events() as events:
        _get("/self-metered/", tenant=None, data={"t": "hooli"})
    assert [e.tenant_id for e in events] == ["hooli"]


@pytest.mark.django_db
def test_drf_token_user_is_seen_after_the_view(
    quiet: MeterSettings, django_capture_on_commit_callbacks: Any
) -> None:
    quiet(TENANT={"user_attr": "username"})
    user = User.objects.create_user("umbrella", password="x")
    token = Token.objects.create(user=user)
    client = Client()
    with capture_events() as events, django_capture_on_commit_callbacks(execute=True):
        assert client.get("/api/whoami/").status_code == 401
        response = client.get("/api/whoami/", headers={"Authorization": f"Token {token.key}"})
    assert response.status_code == 200
    assert response.json() == {"user": "umbrella"}
    assert [(e.tenant_id, e.meter_id) for e in events] == [("umbrella", "rule.executed.small")]


@pytest.mark.django_db
def test_session_user_attribute_is_the_default_resolver(
    quiet: MeterSettings, django_capture_on_commit_callbacks: Any
) -> None:
    quiet(TENANT={"user_attr": "username"})
    client = Client()
    client.force_login(User.objects.create_user("wonka"))
    with capture_events() as events, django_capture_on_commit_callbacks(execute=True):
        client.get("/self-metered/")
    assert [e.tenant_id for e in events] == ["wonka"]


def test_site_serves_fast_with_the_backend_unreachable(
    meter_settings: MeterSettings, closed_port_url: str
) -> None:
    meter_settings(
        KAFKA_URL=closed_port_url,
        INTERNAL_URL=closed_port_url,
        RULES=RULES,
        TENANT=TRUSTED,
        STORE="memory",
        MAX_RETRIES=0,
    )
    client = Client()
    started = time.monotonic()
    with capture_events() as events:
        statuses = [
            client.get("/documents/3/export", headers={"X-Tenant": "acme"}).status_code
            for _ in range(30)
        ]
    elapsed = time.monotonic() - started
    assert statuses == [200] * 30
    assert len(events) == 30
    assert elapsed < 3.0
    assert get_client().flush(5)
    assert get_client().stats()["sent"] == 0


@pytest.mark.django_db
def test_site_serves_with_metering_misconfigured_and_keeps_the_usage(settings: Any) -> None:
    # no KAFKA_URL (and no METER_KAFKA_URL): the client cannot be built
    settings.METER = {"ENABLED": True, "DEVICE_ID": "web", "RULES": RULES, "TENANT": TRUSTED}
    assert _get("/documents/3/export").status_code == 200
    assert _get("/self-metered/").status_code == 200
    # (the ERROR line is rate limited per process; what matters is that nothing is lost)
    rows = list(FailedMeterEvent.objects.all())
    assert {row.meter_id for row in rows} >= {"report.generated.large"}
    assert len(rows) >= 2
    assert all(row.status == "failed" and "misconfigured" in row.last_error for row in rows)


def test_internal_errors_are_logged_and_swallowed(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fresh rate limiter: an earlier test may have used up this process's ERROR line
    monkeypatch.setattr(metering, "_usage_failed", LogThrottle(metering.logger))

    def broken(request: Any, response: Any) -> int:
        raise ZeroDivisionError("bug")

    quiet(RULES={"/ok/": {"meter": "report.generated.small", "usage": broken}})
    with capture_events() as events, caplog.at_level(logging.ERROR):
        assert _get("/ok/").status_code == 200
    assert list(events) == []
    assert "ZeroDivisionError" in caplog.text


def test_device_from_a_trusted_header_and_default_device(quiet: MeterSettings) -> None:
    quiet(DEVICE={"header": "X-Device", "trusted": True})
    with capture_events() as events:
        assert _get("/documents/7/scan", HTTP_X_DEVICE="scanner-9").status_code == 200
        assert _get("/documents/8/scan").status_code == 200  # no header: DEVICE_ID
    assert [e.device_id for e in events] == ["scanner-9", "tests"]


def test_a_utf8_header_id_is_read_as_utf8(quiet: MeterSettings) -> None:
    # WSGI gives header bytes as Latin-1 text: a gateway's "café" was billed as "cafÃ©"
    quiet(DEVICE={"header": "X-Device", "trusted": True})
    with capture_events() as events:
        utf8 = "scanner-é".encode().decode("latin-1")
        assert _get("/documents/7/scan", HTTP_X_DEVICE=utf8).status_code == 200
        assert _get("/documents/7/scan", HTTP_X_DEVICE="scanner-\xe9").status_code == 200
    assert [e.device_id for e in events] == ["scanner-é", "scanner-é"]


def test_a_usage_header_that_is_not_a_valid_usage_drops_that_meter_only(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metering, "_invalid_usage", LogThrottle(metering.logger, interval=0))
    # the same strings as meter_asgi refuses: both read the header with parse_usage_header
    refused = [str(MAX_USAGE + 1), "+3", "1_000", "2.5", "-1", "abc", ""]
    accepted = {" 4\t": 4, str(MAX_USAGE): MAX_USAGE}
    pages = {"meter": "page.processed.basic", "header": "X-Pages"}
    quiet(RULES={"GET /documents/<int:pk>/scan": [pages, "report.generated.small"]})
    for value in refused:
        with capture_events() as events, caplog.at_level(logging.ERROR):
            caplog.clear()
            response = _get("/documents/7/scan", data={"pages": value})
        assert response.status_code == 200
        assert "X-Pages" not in response.headers
        # the request's other meter is still recorded
        assert [(e.meter_id, e.total_usage) for e in events] == [("report.generated.small", 1)]
        assert (
            "usage of meter 'page.processed.basic' not recorded: total_usage: response header "
            f"'x-pages' must be an int from 0 to {MAX_USAGE} (digits only), got {value!r}"
        ) in caplog.text
    for value, usage in accepted.items():
        with capture_events() as events:
            _get("/documents/7/scan", data={"pages": value})
        assert [(e.meter_id, e.total_usage) for e in events] == [
            ("page.processed.basic", usage),
            ("report.generated.small", 1),
        ]


def test_a_rule_for_the_root_url_meters_it(quiet: MeterSettings) -> None:
    # Django names the root URL's route "" (not "/"): the rule "GET /" must still match it
    quiet(RULES={"GET /": "report.generated.small"})
    with capture_events() as events:
        assert _get("/").status_code == 200
    assert [e.meter_id for e in events] == ["report.generated.small"]


def test_the_no_tenant_line_says_what_was_missing() -> None:
    from django.contrib.auth.models import AnonymousUser
    from django.test import RequestFactory

    from meter_django.resolvers import why_no_tenant

    class Account:
        is_authenticated = True
        profile = None

    request = RequestFactory().get("/")
    config = {"user_attr": "tenant_id"}
    assert "has no user (is AuthenticationMiddleware installed?)" in why_no_tenant(request, config)
    request.user = AnonymousUser()  # type: ignore[assignment]
    assert why_no_tenant(request, config) == "the user is not authenticated (AnonymousUser)"
    request.user = Account()  # type: ignore[assignment]
    assert why_no_tenant(request, config) == (
        "Account has no 'tenant_id' (METER['TENANT'] = {'user_attr': 'tenant_id'})"
    )
    assert why_no_tenant(request, {"user_attr": "profile.tenant_id"}).startswith(
        "Account has no 'profile'"
    )
    assert why_no_tenant(request, {"header": "X-Tenant", "trusted": True}) == (
        "no 'X-Tenant' header (METER['TENANT'])"
    )


def _error_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage()]


def test_unusable_rules_log_one_line_per_interval_not_a_traceback_per_request(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(middleware, "_rules_unusable", LogThrottle(middleware.logger, 0.5))
    quiet(RULES={"/ok/": "no.such.meter"})  # system check meter_django.E005
    with capture_events() as events, caplog.at_level(logging.ERROR, logger="meter"):
        for _ in range(20):
            assert _get("/ok/").status_code == 200
        [line] = _error_lines(caplog, "METER['RULES'] cannot be used")
        assert line.exc_info is None and "no.such.meter" in line.getMessage()
        # (timed from the line: the first request of a test run can be slow)
        time.sleep(max(0.0, line.created + 0.55 - time.time()))
        assert _get("/ok/").status_code == 200
    assert list(events) == []
    _, second = _error_lines(caplog, "METER['RULES'] cannot be used")
    assert "(20 times in the last 0.5s)" in second.getMessage()


@pytest.mark.parametrize(
    ("rules", "path", "message"),
    [
        (  # a usage header that is not an int: ERROR usage of meter ... not recorded
            {"/documents/<int:pk>/scan": {"meter": "page.processed.basic", "header": "X-Pages"}},
            "/documents/7/scan?pages=abc",
            "usage of meter 'page.processed.basic' not recorded",
        ),
        (  # a usage callable that answers a negative amount
            {"/ok/": {"meter": "report.generated.small", "usage": lambda rq, rs: -1}},
            "/ok/",
            "must be an int >= 0, got -1",
        ),
    ],
)
def test_invalid_usage_logs_one_line_per_interval_not_one_per_request(
    quiet: MeterSettings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    rules: dict[str, Any],
    path: str,
    message: str,
) -> None:
    monkeypatch.setattr(metering, "_invalid_usage", LogThrottle(metering.logger, 0.5))
    quiet(RULES=rules)
    with capture_events() as events, caplog.at_level(logging.ERROR, logger="meter"):
        for _ in range(20):
            assert _get(path).status_code == 200
        [line] = _error_lines(caplog, message)
        time.sleep(max(0.0, line.created + 0.55 - time.time()))
        assert _get(path).status_code == 200
    assert list(events) == []
    _, second = _error_lines(caplog, message)
    assert "(20 times in the last 0.5s)" in second.getMessage()


def _broken(*args: Any) -> Any:
    raise ZeroDivisionError("bug")


def _throttled(
    caplog: pytest.LogCaptureFixture, request: Callable[[], object], *messages: str, n: int = 20
) -> None:
    """Make ``n`` requests, then one more once the 0.5 s interval is over: each ERROR
    line of ``messages`` is logged once, with its traceback (an error reporter gets one
    per interval), then once more with the count. The tracebacks of the occurrences held
    back go to DEBUG."""
    with caplog.at_level(logging.DEBUG, logger="meter"):
        for _ in range(n):
            request()
        for message in messages:
            [first] = _error_lines(caplog, message)
            assert first.exc_info is not None
            # (timed from the line: the first request of a test run can be slow)
            time.sleep(max(0.0, first.created + 0.55 - time.time()))
        request()
    for message in messages:
        _, second = _error_lines(caplog, message)
        assert second.exc_info is not None
        assert f"({n} times in the last 0.5s)" in second.getMessage()
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(debug) == len(messages) * (n - 1)


@pytest.mark.parametrize(
    ("throttle", "overrides", "path", "tenant", "message"),
    [
        (  # a usage callable of a rule that raises
            "_usage_failed",
            {"RULES": {"/ok/": {"meter": "report.generated.small", "usage": _broken}}},
            "/ok/",
            "acme",
            "usage of meter 'report.generated.small' could not be computed (GET /ok/): "
            "not recorded: ZeroDivisionError: bug",
        ),
        (
            "_tenant_resolver_failed",
            {"TENANT": _broken},
            "/self-metered/",
            "acme",
            "the tenant resolver failed: usage of GET /self-metered/ not recorded: "
            "ZeroDivisionError: bug",
        ),
        (
            "_device_resolver_failed",
            {"DEVICE": _broken},
            "/self-metered/",
            "acme",
            "the device resolver failed: usage of GET /self-metered/ not recorded: "
            "ZeroDivisionError: bug",
        ),
        (  # a tenant id no event can have: the event is refused
            "_event_refused",
            {},
            "/self-metered/",
            "..",
            "usage of meter 'report.generated.medium' for tenant '..' (GET /self-metered/) "
            "not recorded: InvalidEvent: ",
        ),
    ],
)
def test_metering_failures_log_one_line_per_interval_not_a_traceback_per_request(
    quiet: MeterSettings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    throttle: str,
    overrides: dict[str, Any],
    path: str,
    tenant: str,
    message: str,
) -> None:
    monkeypatch.setattr(metering, throttle, LogThrottle(metering.logger, 0.5))
    quiet(**overrides)
    with capture_events() as events:
        _throttled(caplog, lambda: _get(path, tenant=tenant), message)
    assert list(events) == []


def test_events_refused_and_recording_failures_are_throttled_apart(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metering, "_event_refused", LogThrottle(metering.logger, 0.5))
    monkeypatch.setattr(metering, "_not_recorded", LogThrottle(metering.logger, 0.5))
    quiet(RULES={"/self-metered/": "report.generated.large"})
    real = metering.record_decided_usage

    def record(**event: Any) -> str:
        if event["meter_id"] == "report.generated.large":
            raise RuntimeError("store down")
        return real(**event)

    monkeypatch.setattr(metering, "record_decided_usage", record)
    # at each request one event fails and the other is refused (a bad tenant id):
    # neither condition hides the other
    with capture_events() as events:
        _throttled(
            caplog,
            lambda: _get("/self-metered/", tenant=".."),
            "usage of meter 'report.generated.large' for tenant '..' (GET /self-metered/) "
            "not recorded: RuntimeError: store down",
            "usage of meter 'report.generated.medium' for tenant '..' (GET /self-metered/) "
            "not recorded: InvalidEvent: ",
        )
    assert list(events) == []


@pytest.mark.parametrize(
    ("throttle", "patch", "overrides", "path", "message"),
    [
        (  # _attach
            "_attach_failed",
            "new_request_usage",
            {},
            "/ok/",
            "metering is misconfigured: request.meter of GET /ok/ not set up: "
            "ZeroDivisionError: bug",
        ),
        (  # _collect_and_record
            "_record_failed",
            "record_request",
            {},
            "/documents/7/export",
            "metering of GET /documents/7/export failed: usage not recorded: "
            "ZeroDivisionError: bug",
        ),
        (  # __call__: settings the system checks report (meter_django.E008)
            "_internal_error",
            None,
            {"METER_STATUSES": "2xx"},
            "/documents/7/export",
            "metering of GET /documents/7/export failed: ConfigurationError: "
            "METER['METER_STATUSES']",
        ),
    ],
)
def test_middleware_errors_log_one_line_per_interval_not_a_traceback_per_request(
    quiet: MeterSettings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    throttle: str,
    patch: str | None,
    overrides: dict[str, Any],
    path: str,
    message: str,
) -> None:
    monkeypatch.setattr(middleware, throttle, LogThrottle(middleware.logger, 0.5))
    if patch is not None:
        monkeypatch.setattr(middleware, patch, _broken)
    quiet(**overrides)

    def request() -> None:
        assert _get(path).status_code == 200

    with capture_events() as events:
        _throttled(caplog, request, message)
    assert list(events) == []


def test_middleware_errors_on_the_async_stack_log_one_line_per_interval(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(middleware, "_internal_error", LogThrottle(middleware.logger, 0.5))
    quiet(METER_STATUSES="2xx")
    client = AsyncClient(headers={"X-Tenant": "acme"})

    def request() -> None:
        assert aget("/async/", client=client).status_code == 200

    with capture_events() as events:
        _throttled(caplog, request, "metering of GET /async/ failed: ConfigurationError: ")
    assert list(events) == []


def test_a_failure_of_another_meter_is_logged_at_once_not_hidden_by_the_first(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: Any, response: Any) -> int:
        raise ZeroDivisionError("bug")

    def other(request: Any, response: Any) -> int:
        raise ZeroDivisionError("another bug")

    quiet(RULES={"/ok/": [{"meter": "report.generated.small", "usage": broken}],
                 "/documents/<int:pk>/export": [{"meter": "report.generated.large",
                                                  "usage": other}]})  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="meter"):
        for _ in range(5):
            assert _get("/ok/").status_code == 200
        assert _get("/documents/7/export").status_code == 200
    lines = [r.getMessage() for r in caplog.records if "could not be computed" in r.getMessage()]
    assert len(lines) == 2
    assert "'report.generated.large'" in lines[1]


def test_the_middleware_listed_twice_meters_a_request_once(
    quiet: MeterSettings, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # (each would bill it under an event id of its own: billed twice)
    quiet()
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "meter_django.middleware.MeterMiddleware"]
    with capture_events() as events, caplog.at_level("ERROR", logger="meter"):
        assert _get("/documents/7/scan").status_code == 200
        asgi = aget("/documents/8/scan", headers={"X-Tenant": "a"})
        assert asgi.status_code == 200  # (the middleware in async mode)
    assert [(e.meter_id, e.total_usage) for e in events] == [("page.processed.basic", 3)] * 2
    assert "listed more than once in MIDDLEWARE" in caplog.text


def test_a_route_rule_under_i18n_patterns_meters_every_language(
    quiet: MeterSettings, settings: Any
) -> None:
    # urls.py writes path("page/") inside i18n_patterns(): the route Django resolves is
    # "en/page/" or "fr/page/" by the language; a rule written as urls.py has it billed
    # none of them, and one written "GET /en/page/" (the check's hint) only English.
    settings.ROOT_URLCONF = "tests.django_app.urls_i18n"
    settings.LANGUAGES = [("en", "English"), ("fr", "French")]
    settings.MIDDLEWARE = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.locale.LocaleMiddleware",
        *settings.MIDDLEWARE[1:],
    ]
    quiet(RULES={"GET /page/": "report.generated.small", "GET /legacy/": "page.processed.basic",
                 "GET /switch/": "report.generated.medium"})  # fmt: skip
    from meter_django.checks import check_settings

    assert [m.id for m in check_settings()] == ["meter_django.W003"]  # /legacy/ only
    with capture_events() as events:
        for path in ("/en/page/", "/fr/page/", "/en/legacy/", "/en/switch/", "/fr/switch/"):
            assert _get(path).status_code == 200
    # (a view that switches the active language is billed by the route it was asked for)
    assert [e.meter_id for e in events] == ["report.generated.small"] * 2 + [
        "report.generated.medium"
    ] * 2


def test_the_middleware_without_the_app_installed_stops_the_server_at_start() -> None:
    # Without "meter_django" in INSTALLED_APPS there are no checks to say so: each request
    # logged a traceback and nothing was metered. Django's handler loads its middleware
    # as the server starts: the error shows there, naming the fix.
    script = textwrap.dedent(
        """
        import django
        from django.conf import settings
        settings.configure(
            INSTALLED_APPS=["django.contrib.contenttypes"], ROOT_URLCONF=__name__,
            MIDDLEWARE=["meter_django.middleware.MeterMiddleware"], ALLOWED_HOSTS=["*"],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        )
        urlpatterns = []
        django.setup()
        from django.core.exceptions import ImproperlyConfigured
        from django.core.handlers.wsgi import WSGIHandler
        try:
            WSGIHandler()
        except ImproperlyConfigured as exc:
            print("refused:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "refused: meter_django.middleware.MeterMiddleware needs 'meter_django' in " \
        "INSTALLED_APPS" in done.stdout, done.stderr  # fmt: skip


def test_a_rule_and_the_view_billing_the_same_meter_is_said(
    quiet: MeterSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # @meter on a view plus a rule for its route and meter: billed twice, silently
    quiet(
        RULES={"GET /decorated/": "page.processed.advanced", "GET /ok/": "report.generated.small"}
    )
    caplog.set_level(logging.WARNING, logger="meter")
    with capture_events() as events:
        _get("/decorated/")
        _get("/ok/")
    assert sorted((e.meter_id, e.total_usage) for e in events) == [
        ("page.processed.advanced", 1), ("page.processed.advanced", 5),
        ("report.generated.small", 1),
    ]  # fmt: skip
    [line] = [r.getMessage() for r in caplog.records if "billed by both" in r.getMessage()]
    assert line.startswith("GET /decorated/: page.processed.advanced billed by both a ")
