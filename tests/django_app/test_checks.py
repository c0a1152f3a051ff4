"""System checks: one test per id, and `manage.py check` really runs them."""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from meter_core import register_meter
from meter_django import decorators, meter
from meter_django.checks import CHECKS, check_settings

GOOD = {"KAFKA_URL": "http://127.0.0.1:9", "DEVICE_ID": "web"}
SESSION_RULE = {"/chat": {"meter": "chat.on.time_hours", "session": True}}


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
        ({**GOOD, "STORE": "redis"}, "meter_django.E009"),
        ({**GOOD, "DATABASE": "other"}, "meter_django.E009"),
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
        ({**GOOD, "RULES": {"/x": "page.processed.basic"}}, None),
    ],
)
def test_each_problem_has_its_id(settings: Any, meter: Any, expected: str | None) -> None:
    ids = _ids(settings, meter)
    assert ids == ([expected] if expected else [])


def test_rules_without_the_middleware_warn(settings: Any) -> None:
    ids = _ids(
        settings,
        {**GOOD, "RULES": {"/x": "page.processed.basic"}},
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
    assert "'/chat'" in message.msg


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
        call_command("check")

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
        call_command("check")
    assert "meter_django.E004" in str(info.value)
    assert "meter_django.E011" in str(info.value)
    assert "meter_django.E007" in str(info.value)
    assert "forge" in str(info.value)
