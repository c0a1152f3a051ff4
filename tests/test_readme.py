"""The README's reference tables are the documentation users read: they must name every
client option, environment variable, meter and Django system check that the code has."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter_core import CLIENT_OPTIONS, METERS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(CLIENT_OPTIONS))
def test_every_client_option_is_documented_with_its_setting_and_variable(name: str) -> None:
    option = CLIENT_OPTIONS[name]
    row = next((line for line in README.splitlines() if line.startswith(f"| `{name}` |")), None)
    assert row is not None, f"no README row for option {name}"
    assert f"`{option.setting_name}`" in row
    if option.env:
        assert f"`{option.env}`" in row


@pytest.mark.parametrize("meter_id", sorted(METERS))
def test_every_meter_of_the_catalog_is_documented(meter_id: str) -> None:
    assert f"| `{meter_id}` |" in README


def test_every_django_system_check_id_is_documented() -> None:
    from meter_django.checks import CHECKS

    for check_id in CHECKS:
        short = check_id.split(".")[-1]
        assert f"`{short}`" in README or f"`meter_django.{short}`" in README, check_id
