"""The batch-size bound of a record must never be below its real encoded size, or a
produce request could exceed max_batch_bytes."""

from __future__ import annotations

import json

import pytest

from meter_core import UsageEvent
from meter_core.delivery import _encoded_size_bound

CASES = [
    UsageEvent("acme", "web-1", "page.processed.basic", 3),
    UsageEvent('a"b\\c', 'd"\\"', "page.processed.basic", 2**62),
    UsageEvent("t" * 128, "d" * 128, "m" * 128, 2**63 - 1, allow_unknown_meter=True),
    UsageEvent("acme", "web", "chat.on.time_hours", start_time=4_000_000_000_000 - 1),
    UsageEvent("acme", "web", "chat.on.time_hours", end_time=1_700_000_000_000),
    UsageEvent("müller", "gerät", "page.processed.basic", 1),
    UsageEvent("acme", "web", "page.processed.basic", 1, metadata={"k": "v" * 1024}),
]


@pytest.mark.parametrize("event", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("customer", ["cust-1", 'c"\\' * 40, "kunde-ä", "x" * 128])
def test_size_bound_is_never_below_the_encoded_size(event: UsageEvent, customer: str) -> None:
    record = {"key": customer, "value": event.record_value(customer)}
    assert _encoded_size_bound(event, customer, record) >= len(json.dumps(record))


def test_size_bound_stays_close_for_plain_events() -> None:
    event = CASES[0]
    record = {"key": "cust-1", "value": event.record_value("cust-1")}
    assert _encoded_size_bound(event, "cust-1", record) <= 2 * len(json.dumps(record))


def test_generated_event_ids_are_distinct_canonical_uuids() -> None:
    import uuid

    ids = {UsageEvent("acme", "web", "page.processed.basic", 1).event_id for _ in range(20_000)}
    assert len(ids) == 20_000
    for text in list(ids)[:200]:
        parsed = uuid.UUID(text)
        assert parsed.variant == uuid.RFC_4122
        assert parsed.version == 8
        assert str(parsed) == text


def test_event_ids_take_a_new_prefix_when_the_counter_would_wrap() -> None:
    import itertools

    from meter_core import events

    ids = events._EventIds()
    prefix, _ = ids.state
    ids.state = (prefix, itertools.count(events._COUNTER_LIMIT - 1))
    last = ids.new()
    assert last == f"{prefix}{events._COUNTER_LIMIT - 1:012x}"
    wrapped = ids.new()
    assert not wrapped.startswith(prefix)
    assert len(wrapped) == 36 and wrapped != last
