"""System checks: one test per id, and `manage.py check` really runs them."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from meter_django.checks import CHECKS, check_settings

GOOD = {"KAFKA_URL": "http://127.0.0.1:9", "DEVICE_ID": "web"}


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
        ({**GOOD, "PORTAL_URL": "http://portal"}, "meter_django.W001"),
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
    assert "meter_django.E007" in str(info.value)
    assert "forge" in str(info.value)
