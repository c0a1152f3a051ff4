"""The package's shape: lazy public API, app loading, migrations in sync."""

from __future__ import annotations

import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

import meter_django
from meter_django.conf import DJANGO_DEFAULTS, client_option_keys

ROOT = Path(__file__).resolve().parents[2]


def test_public_api_is_exactly_the_documented_one() -> None:
    assert set(meter_django.__all__) == {
        "arecord_session",
        "arecord_usage",
        "get_client",
        "meter",
        "record_session",
        "record_usage",
        "reset_client",
    }
    for name in meter_django.__all__:
        assert callable(getattr(meter_django, name))


def test_importing_the_package_needs_no_settings() -> None:
    code = "import meter_django, sys; print('meter_django.models' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def test_settings_keys_derive_from_the_client_options() -> None:
    keys = client_option_keys()
    assert {"KAFKA_URL", "MAX_RETRIES", "BATCH_SIZE", "FLUSH_INTERVAL", "DURABLE"} <= set(keys)
    assert not set(keys) & set(DJANGO_DEFAULTS)


@pytest.mark.django_db
def test_migrations_match_the_models() -> None:
    call_command("makemigrations", "meter_django", "--check", "--dry-run", stdout=StringIO())


def test_the_client_is_built_once_and_reset_on_settings_change(settings: object) -> None:
    first = meter_django.get_client()
    assert meter_django.get_client() is first
    settings.METER = {"ENABLED": False, "DEVICE_ID": "other"}  # type: ignore[attr-defined]
    second = meter_django.get_client()
    assert second is not first
    assert second.device_id == "other"


def test_a_value_built_while_the_settings_change_is_not_kept() -> None:
    from meter_django.conf import MeterSettings

    conf = MeterSettings()

    def build_during_a_change() -> str:
        conf.clear()  # settings changed (the signal) while the old value was being built
        return "built from the old settings"

    assert conf.cached("x", build_during_a_change) == "built from the old settings"
    assert conf.cached("x", lambda: "new") == "new"  # the stale value was not cached


def test_environment_variables_fill_missing_keys(
    settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METER_KAFKA_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("METER_BATCH_SIZE", "7")
    monkeypatch.setenv("METER_DEVICE_ID", "from-env")
    settings.METER = {"DEVICE_ID": "from-settings"}  # type: ignore[attr-defined]
    client = meter_django.get_client()
    assert client.options["kafka_url"] == "http://127.0.0.1:9"
    assert client.options["batch_size"] == 7
    assert client.device_id == "from-settings"  # METER wins over the environment
