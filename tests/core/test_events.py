"""UsageEvent: every validation rule names its field; events are immutable."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from meter_core import InvalidEvent, RequestUsage, UsageEvent, now_ms

BASE = {"tenant_id": "acme", "device_id": "web-1", "meter_id": "page.processed.basic"}


def make(**overrides: object) -> UsageEvent:
    fields = {**BASE, "total_usage": 1, **overrides}
    return UsageEvent(**fields)  # type: ignore[arg-type]


def invalid_field(**overrides: object) -> str:
    with pytest.raises(InvalidEvent) as info:
        make(**overrides)
    assert isinstance(info.value, ValueError)
    return info.value.field


def test_defaults_give_a_uuid_and_the_current_time() -> None:
    before = now_ms()
    event = make()
    assert uuid.UUID(event.event_id).variant == uuid.RFC_4122
    assert before <= event.event_time <= now_ms()
    assert dict(event.metadata) == {}


def test_event_id_is_generated_once_and_kept() -> None:
    event = make()
    assert event.event_id == event.event_id
    assert make().event_id != event.event_id
    copy = dataclasses.replace(event, total_usage=5)
    assert copy.event_id == event.event_id


def test_event_is_immutable_including_metadata() -> None:
    source = {"k": "v"}
    event = make(metadata=source)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.total_usage = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.metadata["k"] = "changed"  # type: ignore[index]
    source["k"] = "changed"
    assert event.metadata["k"] == "v"


def test_unknown_meter_is_rejected_unless_allowed() -> None:
    assert invalid_field(meter_id="document.basic.page") == "meter_id"
    event = make(meter_id="document.basic.page", allow_unknown_meter=True)
    assert event.meter_id == "document.basic.page"


@pytest.mark.parametrize("usage", [-1, 1.5, "3", True, False, None])
def test_usage_must_be_a_non_negative_int_and_not_a_bool(usage: object) -> None:
    assert invalid_field(total_usage=usage) == "total_usage"


def test_zero_usage_is_accepted() -> None:
    assert make(total_usage=0).total_usage == 0


def test_usage_a_handler_adds_is_checked_at_once() -> None:
    usage = RequestUsage()
    usage.add("page.processed.basic", 2**63 - 1)
    for bad in (2**63, -1, 1.0):
        with pytest.raises(InvalidEvent, match="must be an int from 0 to 9223372036854775807"):
            usage.add("page.processed.basic", bad)  # type: ignore[arg-type]
    assert usage.entries == [("page.processed.basic", 2**63 - 1, {})]


def test_request_usage_checks_metadata_at_add_and_keeps_a_copy() -> None:
    usage = RequestUsage()
    with pytest.raises(InvalidEvent, match="value of 'pages' must be a str, got 3"):
        usage.add("page.processed.basic", 1, metadata={"pages": 3})  # type: ignore[dict-item]
    with pytest.raises(InvalidEvent, match="must be a mapping"):
        usage.add("page.processed.basic", 1, metadata=["doc"])  # type: ignore[arg-type]
    assert usage.entries == []  # a refused add leaves nothing behind
    metadata = {"doc": "d-1"}
    usage.add("page.processed.basic", 1, metadata=metadata)
    metadata["doc"] = "changed later"
    assert usage.entries == [("page.processed.basic", 1, {"doc": "d-1"})]


def test_usage_must_fit_a_signed_64_bit_integer() -> None:
    assert make(total_usage=2**63 - 1).total_usage == 2**63 - 1
    with pytest.raises(InvalidEvent, match="at most 9223372036854775807") as raised:
        make(total_usage=2**63)
    assert raised.value.field == "total_usage"
    with pytest.raises(InvalidEvent, match="must not be negative"):
        make(total_usage=-5)


@pytest.mark.parametrize(
    "metadata",
    [
        {"k": 1},
        {1: "v"},
        ["k", "v"],
        {f"k{i}": "v" for i in range(51)},
        {"k" * 65: "v"},
        {"k": "v" * 1025},
    ],
)
def test_metadata_must_be_str_to_str_within_limits(metadata: object) -> None:
    assert invalid_field(metadata=metadata) == "metadata"


def test_metadata_at_the_limits_is_accepted() -> None:
    metadata = {f"{i:064d}": "v" * 1024 for i in range(50)}
    assert len(make(metadata=metadata).metadata) == 50


@pytest.mark.parametrize("name", ["tenant_id", "device_id", "meter_id"])
@pytest.mark.parametrize("value", ["", "x" * 129, "bad\nid", "bad\x00id", "tab\tid", 42, None])
def test_ids_must_be_short_printable_strings(name: str, value: object) -> None:
    assert invalid_field(**{name: value}) == name


def test_ids_of_128_characters_and_unicode_are_fine() -> None:
    event = make(tenant_id="t" * 128, device_id="gerät-ß/1 2")
    assert len(event.tenant_id) == 128


@pytest.mark.parametrize(
    "value", [1_700_000_000, 1_700_000_000_000_000, 1.7e12, "1700000000000", True]
)
def test_event_time_must_be_epoch_milliseconds(value: object) -> None:
    assert invalid_field(event_time=value) == "event_time"


def test_session_event_has_exactly_one_boundary_and_no_usage() -> None:
    start = make(total_usage=None, start_time=now_ms())
    assert start.is_session
    assert invalid_field(total_usage=None, start_time=now_ms(), end_time=now_ms()) == "start_time"
    assert invalid_field(total_usage=5, start_time=now_ms()) == "total_usage"
    assert invalid_field(total_usage=None, end_time=17) == "end_time"


def test_event_id_must_be_a_uuid() -> None:
    assert invalid_field(event_id="not-a-uuid") == "event_id"
    given = uuid.uuid4()
    assert make(event_id=str(given).upper()).event_id == str(given)


def test_record_value_has_meter_lib_fields_in_order_then_ours() -> None:
    event = make(total_usage=3, event_time=1_700_000_000_000, metadata={"a": "b"})
    value = event.record_value("cust-1")
    assert list(value) == [
        "meter_id", "customer_id", "total_usage", "event_time", "metadata",
        "event_id", "tenant_id", "device_id",
    ]  # fmt: skip
    assert value["customer_id"] == "cust-1"
    assert value["metadata"] == {"a": "b"}


def test_session_record_value_matches_meter_lib_ai_event() -> None:
    start = make(total_usage=None, start_time=1_700_000_000_000).record_value("c")
    assert list(start)[:5] == ["ai_event", "meter_id", "customer_id", "metadata", "start_time"]
    assert start["ai_event"] is True
    end = make(total_usage=None, end_time=1_700_000_000_001).record_value("c")
    assert "start_time" not in end
    assert end["end_time"] == 1_700_000_000_001


def test_dict_round_trip_keeps_every_field_and_skips_the_catalog() -> None:
    event = make(meter_id="custom.meter", allow_unknown_meter=True, metadata={"x": "y"})
    again = UsageEvent.from_dict(event.to_dict())
    assert again == event
    assert again.event_id == event.event_id
    session = make(total_usage=None, end_time=1_700_000_000_000)
    assert UsageEvent.from_dict(session.to_dict()) == session


def test_events_hash_by_event_id() -> None:
    event = make()
    assert {event: 1}[event] == 1


def test_events_pickle_and_copy_with_their_id_and_metadata() -> None:
    import copy
    import pickle

    for event in (make(metadata={"k": "v"}), make(meter_id="x.custom", allow_unknown_meter=True)):
        for clone in (pickle.loads(pickle.dumps(event)), copy.deepcopy(event), copy.copy(event)):
            assert clone == event
            assert clone.event_id == event.event_id
            assert dict(clone.metadata) == dict(event.metadata)


@pytest.mark.parametrize("value", ["a\x00b", "\ud800", "x\udfffy"])
def test_metadata_no_store_can_keep_is_refused_when_the_event_is_built(value: str) -> None:
    # (PostgreSQL refuses NUL in text and JSON; a lone surrogate cannot be UTF-8 encoded:
    # accepted, one such event would fail the store write of its whole batch)
    assert invalid_field(metadata={"k": value}) == "metadata"
    assert invalid_field(metadata={value: "v"}) == "metadata"
    usage = RequestUsage()
    with pytest.raises(InvalidEvent, match="metadata"):
        usage.add("page.processed.basic", 1, metadata={"k": value})
    assert make(metadata={"k": "two\nlines\ttab"}).metadata["k"] == "two\nlines\ttab"


@pytest.mark.parametrize("field", ["tenant_id", "device_id"])
@pytest.mark.parametrize("value", [".", "..", "a\udc80"])
def test_ids_that_are_path_steps_or_hold_lone_surrogates_are_refused(
    field: str, value: str
) -> None:
    assert invalid_field(**{field: value}) == field
