"""The meter catalog of the wire protocol, and registration of extra meters."""

from __future__ import annotations

import re
from typing import Any

import pytest

from meter_core import (
    METERS,
    InvalidEvent,
    Meter,
    UsageEvent,
    is_known_meter,
    register_meter,
)
from meter_core.catalog import _meters


def test_catalog_holds_the_18_meters_of_the_wire_protocol() -> None:
    assert len(METERS) >= 18
    assert METERS["page.processed.basic"] == Meter(
        "page.processed.basic", "Basic Document Scanning", "volume",
        "Total number of basic pages processed",
    )  # fmt: skip
    assert METERS["chat.on.time_hours"].type == "performance"
    assert METERS["chat.query.time_secs"].type == "performance"
    volume = [m for m in METERS.values() if m.type == "volume"]
    assert len(volume) >= 16
    assert "document.basic.page" not in METERS  # the old guide's example is not a meter


def test_catalog_is_read_only() -> None:
    with pytest.raises(TypeError):
        METERS["x"] = Meter("x", "x", "volume", "")  # type: ignore[index]


def test_register_meter_makes_a_meter_known() -> None:
    try:
        meter = register_meter("test.registered", "Test", "performance", "for a test")
        assert is_known_meter("test.registered")
        assert METERS["test.registered"] is meter
        UsageEvent("t", "d", "test.registered", 1)
        assert register_meter("test.registered", "Test", "performance", "for a test") == meter
        with pytest.raises(ValueError, match="already registered"):
            register_meter("test.registered", "Other", "volume")
    finally:
        _meters.pop("test.registered", None)


@pytest.mark.parametrize("meter_id", ["", "x" * 129, "a\nb"])
def test_register_meter_rejects_bad_ids(meter_id: str) -> None:
    with pytest.raises(ValueError, match="meter_id"):
        register_meter(meter_id)


def test_register_meter_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="type"):
        register_meter("test.bad.type", type="hourly")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": 5}, "name: must be a str, got 5"),
        ({"name": None}, "name: must be a str, got None"),
        ({"description": b"bytes"}, "description: must be a str, got b'bytes'"),
        ({"type": ["volume"]}, "type: must be 'volume' or 'performance', got ['volume']"),
        ({"type": None}, "type: must be 'volume' or 'performance', got None"),
    ],
)
def test_register_meter_refuses_bad_arguments_and_registers_nothing(
    options: dict[str, Any], message: str
) -> None:
    try:
        with pytest.raises(ValueError, match=re.escape(message) + "$"):
            register_meter("test.bad.argument", **options)
        assert not is_known_meter("test.bad.argument")
    finally:
        _meters.pop("test.bad.argument", None)


def test_register_meter_names_a_meter_id_that_is_not_a_str() -> None:
    with pytest.raises(InvalidEvent) as caught:
        register_meter(5)  # type: ignore[arg-type]
    assert str(caught.value) == "meter_id: must be a str, got int"
