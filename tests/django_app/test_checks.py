"""System checks: one test per id, and `manage.py check` really runs them."""

from __future__ import annotations

import os
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.urls import resolve

from meter_core import register_meter
from meter_django import decorators, meter
from meter_django.checks import CHECKS, check_settings
from meter_django.conf import MeterSettings

GOOD = {"KAFKA_URL": "http://127.0.0.1:9", "DEVICE_ID": "web"}
SESSION_RULE = {"/async/": {"meter": "chat.on.time_hours", "session": True}}


@pytest.fixture(autouse=True)
def _no_meter_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks read METER_* variables: none leak in from the shell running the tests."""
    for name in [n for n in os.environ if n.startswith("METER_") and "_TEST_" not in n]:
        monkeypatch.delenv(name)


def _ids(settings: Any, meter: Any, **extra: Any) -> list[str]:
    settings.METER = meter
    for key, value in extra.items():
        setattr(settings, key, value)
    return [m.id for m in check_settings()]


def test_good_settings_pass(settings: Any) -> None:
    assert _ids(settings, GOOD) == []
    assert _ids(settings, {"ENABLED": False}) == []
    assert _ids(settings, {"TRANSPORT": "log", "DEVICE_ID": "dev"}) == []


@pytest.mark.parametrize(
    ("meter", "expected"),
    [
        ([("KAFKA_URL", "x")], "meter_django.E001"),
        ({**GOOD, "KAFKA_URLS": "http://x"}, "meter_django.E002"),
        ({**GOOD, "TIMEOUT": "10"}, "meter_django.E003"),
        ({**GOOD, "MAX_RETRIES": -1}, "meter_django.E003"),
        ({**GOOD, "KAFKA_URL": "ftp://nope"}, "meter_django.E003"),
        ({"DEVICE_ID": "web"}, "meter_django.E004"),
        ({**GOOD, "RULES": {"/x": "no.such.meter"}}, "meter_django.E005"),
        ({**GOOD, "TENANT": {"user_attr": "a", "header": "b"}}, "meter_django.E006"),
        ({**GOOD, "TENANT": "no.such.module.resolver"}, "meter_django.E006"),
        ({**GOOD, "DEVICE": 42}, "meter_django.E006"),
        ({**GOOD, "TENANT": {"header": "X-Tenant-Id"}}, "meter_django.E007"),
        ({**GOOD, "TENANT": {"header": "X-Tenant-Id", "trusted": "yes"}}, "meter_django.E007"),
        ({**GOOD, "METER_STATUSES": "2xx"}, "meter_django.E008"),
        ({**GOOD, "METER_STATUSES": [200, 700]}, "meter_django.E008"),
        ({**GOOD, "METER_STATUSES": iter([200])}, "meter_django.E008"),
        ({**GOOD, "METER_STATUSES": map(int, ["200", "201"])}, "meter_django.E008"),
        ({**GOOD, "STORE": "redis"}, "meter_django.E009"),
        ({**GOOD, "DATABASE": "other"}, "meter_django.E009"),
        ({**GOOD, "DATABASE": ["default"]}, "meter_django.E009"),
        ({**GOOD, "STORE": "json.loads"}, "meter_django.E009"),
        ({**GOOD, "STORE": f"{__name__}.failing_store"}, "meter_django.E009"),
        ({**GOOD, "DURABLE": True, "STORE": "memory"}, "meter_django.E010"),
        ({**GOOD, "BACKOFF_BASE": 5.0, "BACKOFF_CAP": 1.0}, "meter_django.E010"),
        ({"KAFKA_URL": "http://127.0.0.1:9"}, "meter_django.E011"),
        ({"KAFKA_URL": "http://127.0.0.1:9", "DEVICE_ID": None}, "meter_django.E011"),
        ({"TRANSPORT": "log"}, "meter_django.E011"),
        ({"ENABLED": False, "TRANSPORT": "log"}, None),
        ({"KAFKA_URL": "http://x", "DEVICE": {"header": "X-Device", "trusted": True}}, None),
        ({**GOOD, "RULES": SESSION_RULE}, "meter_django.E013"),
        ({**GOOD, "PORTAL_URL": "http://portal"}, "meter_django.W001"),
        ({**GOOD, "PORTAL_URL": "http://portal", "API_KEY": 12345}, "meter_django.E003"),
        ({**GOOD, "RULES": {"/ok/": "page.processed.basic"}}, None),
        ({**GOOD, "RULES": {"/ok": "page.processed.basic"}}, "meter_django.W003"),
        ({**GOOD, "RULES": {"POTS /ok/": "page.processed.basic"}}, "meter_django.W005"),
        ({**GOOD, "RULES": {"PURGE,GET /ok/": "page.processed.basic"}}, None),
    ],
)
def test_each_problem_has_its_id(settings: Any, meter: Any, expected: str | None) -> None:
    ids = _ids(settings, meter)
    assert ids == ([expected] if expected else [])


def failing_store() -> None:
    raise RuntimeError("no such bucket")


def test_a_store_factory_that_raises_is_named_with_its_error(settings: Any) -> None:
    settings.METER = {**GOOD, "STORE": f"{__name__}.failing_store"}
    (message,) = check_settings()
    assert "failing_store' raised RuntimeError: no such bucket" in message.msg


def test_the_middleware_listed_twice_is_an_error(settings: Any) -> None:
    twice = [*settings.MIDDLEWARE, "meter_django.middleware.MeterMiddleware"]
    assert _ids(settings, GOOD, MIDDLEWARE=twice) == ["meter_django.E014"]


def test_rules_without_the_middleware_warn(settings: Any) -> None:
    ids = _ids(
        settings,
        {**GOOD, "RULES": {"/ok/": "page.processed.basic"}},
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    )
    assert ids == ["meter_django.W002"]


def test_environment_variables_are_the_fallback(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METER_KAFKA_URL", "http://127.0.0.1:9")
    assert _ids(settings, {"DEVICE_ID": "web"}) == []
    monkeypatch.setenv("METER_TIMEOUT", "soon")
    [message] = (settings.__setattr__("METER", {"DEVICE_ID": "web"}), check_settings())[1]
    assert message.id == "meter_django.E003"
    assert "METER_TIMEOUT" in message.msg


def test_an_empty_environment_variable_counts_as_unset(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a compose file's "METER_DEVICE_ID: ${DEVICE_ID}" with DEVICE_ID unset)
    monkeypatch.setenv("METER_KAFKA_URL", "")
    monkeypatch.setenv("METER_DEVICE_ID", " ")
    monkeypatch.setenv("METER_TIMEOUT", "")
    messages = (settings.__setattr__("METER", {}), check_settings())[1]
    assert [m.id for m in messages] == ["meter_django.E004", "meter_django.E011"]
    assert "METER_KAFKA_URL is set, but empty" in messages[0].msg
    assert "METER_DEVICE_ID is set, but empty" in messages[1].msg
    monkeypatch.setenv("METER_KAFKA_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("METER_DEVICE_ID", "web")
    assert _ids(settings, {}) == []
    monkeypatch.setenv("METER_ENABLED", "")  # not "off"
    assert MeterSettings().option("enabled") is True


def test_missing_device_id_names_the_three_ways_to_set_it(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.METER = {"KAFKA_URL": "http://127.0.0.1:9"}
    [message] = check_settings()
    assert message.id == "meter_django.E011"
    assert message.hint is not None
    for way in ("METER['DEVICE_ID']", "METER_DEVICE_ID", "METER['DEVICE']"):
        assert way in message.hint
    monkeypatch.setenv("METER_DEVICE_ID", "web")
    assert check_settings() == []


def test_lookup_warning_says_where_the_key_came_from(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.METER = {**GOOD, "API_KEY": "s3cr3t"}
    [message] = check_settings()
    assert message.id == "meter_django.W001"
    assert "METER['API_KEY']" in message.msg
    assert "PORTAL_URL" in message.msg
    monkeypatch.setenv("METER_API_KEY", "s3cr3t")
    settings.METER = GOOD
    [message] = check_settings()
    assert message.id == "meter_django.W001"
    assert "environment variable METER_API_KEY" in message.msg
    assert "METER['API_KEY']" not in message.msg
    assert "s3cr3t" not in message.msg


def test_session_rule_is_named(settings: Any) -> None:
    settings.METER = {**GOOD, "RULES": {"/ok/": "report.generated.small", **SESSION_RULE}}
    [message] = check_settings()
    assert message.id == "meter_django.E013"
    assert "'/async/'" in message.msg


def test_unknown_meter_id_of_a_decorator_is_an_error(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decorators, "_declared", {})  # forget it after the test

    @meter("page.procesed.basic")
    def typo(request: Any) -> Any: ...

    @meter("tests.checks.custom")
    def custom(request: Any) -> Any: ...

    settings.METER = GOOD
    messages = check_settings()
    assert [m.id for m in messages] == ["meter_django.E012", "meter_django.E012"]
    assert "test_unknown_meter_id_of_a_decorator_is_an_error.<locals>.typo" in messages[0].msg
    assert "Did you mean 'page.processed.basic'?" in messages[0].msg
    with pytest.raises(SystemCheckError, match="page.procesed.basic"):
        call_command("check", databases=[])

    register_meter("tests.checks.custom", "Custom meter of the check tests")
    assert [m.msg for m in check_settings()] == [messages[0].msg]
    settings.METER = {**GOOD, "ALLOW_UNKNOWN_METERS": True}
    assert check_settings() == []


def test_messages_never_show_the_api_key(settings: Any) -> None:
    settings.METER = {**GOOD, "API_KEY": 12345, "PORTAL_URL": "nope"}
    text = " ".join(str(m) for m in check_settings())
    assert "12345" not in text
    assert "API_KEY" in text


def test_unknown_key_suggests_the_right_one(settings: Any) -> None:
    settings.METER = {**GOOD, "BATCHSIZE": 10}
    [message] = check_settings()
    assert "BATCH_SIZE" in message.msg


def test_every_id_is_documented_with_a_hint() -> None:
    import meter_django.checks as module

    assert module.__doc__ is not None
    for code in CHECKS:
        assert f"meter_django.{code}" in module.__doc__


def test_manage_py_check_runs_them(settings: Any) -> None:
    settings.METER = {"ENABLED": True, "TENANT": {"header": "X-Tenant"}}
    with pytest.raises(SystemCheckError) as info:
        call_command("check", databases=[])
    assert "meter_django.E004" in str(info.value)
    assert "meter_django.E011" in str(info.value)
    assert "meter_django.E007" in str(info.value)
    assert "forge" in str(info.value)


def _w003(settings: Any, rules: dict[str, Any]) -> list[Any]:
    """The W003 messages for ``rules`` (with otherwise good settings)."""
    settings.METER = {**GOOD, "RULES": rules}
    return [m for m in check_settings() if m.id == "meter_django.W003"]


def _advice(message: Any) -> str:
    """What a W003 hint says about this rule, before the general hint of the registry."""
    assert message.hint.endswith(CHECKS["W003"])
    return str(message.hint.removesuffix(CHECKS["W003"])).strip()


@pytest.mark.parametrize(
    "key",
    [
        "/ok/",
        "GET,POST /reports/",
        "POST /documents/<int:pk>/scan",  # a route of a namespaced include
        "GET /documents/{doc_id}/export",  # other parameter syntax and name
        "ok",
        "documents:scan",  # a view name in a namespace
        "POST vsdoc-scan",  # a DRF router's route, by view name
        "admin:auth_user_change",
    ],
)
def test_rule_that_matches_a_route_or_view_name_does_not_warn(settings: Any, key: str) -> None:
    settings.METER = {**GOOD, "RULES": {key: "page.processed.basic"}}
    assert check_settings() == []


@pytest.mark.parametrize(
    "path", ["/ok/", "/documents/7/scan", "/api/vs-docs/7/scan/", "/admin/auth/user/7/change/"]
)
def test_the_check_sees_the_route_and_view_name_the_middleware_matches(
    settings: Any, path: str
) -> None:
    match = resolve(path)  # what request.resolver_match is for this path
    assert _w003(settings, {f"/{match.route}": "page.processed.basic"}) == []
    assert _w003(settings, {match.view_name: "page.processed.basic"}) == []


def test_rule_without_or_with_an_extra_trailing_slash_says_how_to_fix_it(settings: Any) -> None:
    messages = _w003(
        settings,
        {
            "POST /ok": "page.processed.basic",
            "POST /documents/<int:pk>/scan/": "page.processed.basic",
        },
    )
    assert [m.msg for m in messages] == [
        "METER['RULES']['POST /ok'] never matches: no route of the URLconf is '/ok' "
        "(parameter names aside), so this usage is not metered.",
        "METER['RULES']['POST /documents/<int:pk>/scan/'] never matches: no route of the "
        "URLconf is '/documents/<int:pk>/scan/' (parameter names aside), so this usage is "
        "not metered.",
    ]
    assert [_advice(m) for m in messages] == [
        "The URLconf has this route with the trailing slash: write 'POST /ok/'.",
        "The URLconf has this route without the trailing slash: write "
        "'POST /documents/<int:pk>/scan'.",
    ]


def test_rule_for_a_missing_route_or_view_name_suggests_the_closest(settings: Any) -> None:
    messages = _w003(
        settings,
        {
            "GET /reprots/": "page.processed.basic",
            "documents:scna": "page.processed.basic",
            "export": "page.processed.basic",  # its namespace left out
            "POST documents/<int:pk>/scan": "page.processed.basic",  # no leading slash
        },
    )
    assert [_advice(m) for m in messages] == [
        "Did you mean 'GET /reports/'?",
        "Did you mean 'documents:scan'?",
        "Did you mean 'documents:export'?",
        "A route template starts with '/': write 'POST /documents/<int:pk>/scan'.",
    ]
    assert "no route of the URLconf is '/reprots/'" in messages[0].msg
    assert "no URL pattern is named 'documents:scna'" in messages[1].msg
    assert "no URL pattern is named 'export'" in messages[2].msg


def test_rule_for_nothing_near_any_route_warns_without_a_guess(settings: Any) -> None:
    messages = _w003(
        settings, {"POST /nowhere/": "page.processed.basic", "nope:view": "page.processed.basic"}
    )
    assert "METER['RULES']['POST /nowhere/']" in messages[0].msg
    assert "METER['RULES']['nope:view']" in messages[1].msg
    assert [_advice(m) for m in messages] == ["", ""]
    assert messages[0].hint == CHECKS["W003"]


@pytest.mark.parametrize("key", ["POST /api/vs-docs/<pk>/scan/", "POST /api/vs-docs/<int:pk>/scan"])
def test_template_rule_for_a_drf_router_route_advises_its_view_name(
    settings: Any, key: str
) -> None:
    [message] = _w003(settings, {key: "page.processed.basic"})
    assert _advice(message) == (
        "The route 'api/vs-docs/(?P<pk>[^/.]+)/scan/$' is a regular expression (re_path(), "
        "e.g. of a DRF router), which a route template rule never matches: meter it by its "
        "view name, 'POST vsdoc-scan'."
    )


def test_template_rule_for_the_root_url_matches_it(settings: Any) -> None:
    # Django's route of the root URL is "": RouteRules.match_route takes it as "/"
    assert resolve("/").route == ""
    assert _w003(settings, {"GET /": "page.processed.basic"}) == []
    assert _w003(settings, {"GET home": "page.processed.basic"}) == []


def test_rule_that_does_not_compile_is_left_to_e005(settings: Any) -> None:
    settings.METER = {
        **GOOD,
        "RULES": {"/nowhere/": "no.such.meter", "/reprots/": "page.processed.basic"},
    }
    messages = check_settings()
    assert [m.id for m in messages] == ["meter_django.E005", "meter_django.W003"]
    assert "'/reprots/'" in messages[1].msg


def test_rule_warning_does_not_hide_the_client_check(settings: Any) -> None:
    ids = _ids(
        settings,
        {**GOOD, "DURABLE": True, "STORE": "memory", "RULES": {"/ok": "page.processed.basic"}},
    )
    assert ids == ["meter_django.E010", "meter_django.W003"]


@pytest.mark.parametrize(
    "urlconf",
    [
        "tests.django_app.no_such_urls",  # cannot be imported
        "tests.django_app.views",  # imports, but has no urlpatterns
    ],
)
def test_urlconf_that_cannot_be_walked_gives_no_warning_and_no_crash(
    settings: Any, urlconf: str
) -> None:
    settings.ROOT_URLCONF = urlconf
    settings.METER = {**GOOD, "RULES": {"/nowhere/": "page.processed.basic"}}
    assert check_settings() == []


def test_manage_py_check_shows_the_rule_warning(settings: Any) -> None:
    settings.METER = {**GOOD, "RULES": {"POST /ok": "page.processed.basic"}}
    stderr = StringIO()
    call_command("check", databases=[], stdout=StringIO(), stderr=stderr)  # a warning does not fail
    assert "meter_django.W003" in stderr.getvalue()
    with pytest.raises(SystemCheckError, match=r"write 'POST /ok/'"):
        call_command("check", databases=[], fail_level="WARNING")


def test_a_user_attribute_the_user_model_has_not_is_a_warning(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.contrib.auth.models import User

    monkeypatch.delattr(User, "tenant_id")  # the stock auth.User: no tenant_id
    settings.METER = GOOD  # the default TENANT: request.user.tenant_id
    [warning] = check_settings()
    assert warning.id == "meter_django.W004"
    assert "auth.User has no 'tenant_id'" in warning.msg and "user_attr" in warning.hint
    settings.METER = {**GOOD, "TENANT": {"user_attr": "profile.tenant_id"}}
    assert "has no 'profile'" in check_settings()[0].msg
    for fine in ({"user_attr": "username"}, {"user_attr": "username.upper"},
                 {"user_attr": "auth_token.key"}, {"user_attr": "auth_token.user.username"},
                 {"user_attr": "get_username.x"},  # (a method: not followed)
                 lambda request: "acme"):  # fmt: skip
        settings.METER = {**GOOD, "TENANT": fine}
        assert check_settings() == []


def test_a_user_attr_typo_past_a_relation_is_caught(settings: Any) -> None:
    # request.user.auth_token is the user's rest_framework Token (a reverse one-to-one)
    settings.METER = {**GOOD, "TENANT": {"user_attr": "auth_token.tenant_id"}}
    [warning] = check_settings()
    assert warning.id == "meter_django.W004"
    assert warning.msg == (
        "METER['TENANT'] reads request.user.auth_token.tenant_id, but authtoken.Token "
        "(request.user.auth_token) has no 'tenant_id': no request would be metered."
    )
    settings.METER = {**GOOD, "TENANT": {"user_attr": "auth_token.user.usernme"}}
    [warning] = check_settings()
    assert "auth.User (request.user.auth_token.user) has no 'usernme'" in warning.msg


def test_a_rule_method_that_is_no_http_method_says_the_closest(settings: Any) -> None:
    settings.METER = {**GOOD, "RULES": {"POTS /ok/": "page.processed.basic"}}
    (message,) = check_settings()
    assert "'POTS' is not an HTTP method" in message.msg and "'POST'" in (message.hint or "")
