"""What the sender's log tells an operator through an outage: one line per kind of
failure and interval, with the events counted, and a line when the backend takes
events again, with what was held back meanwhile."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from meter_core import MeterClient
from meter_core import sender as sender_module
from meter_core.devserver import DevServer
from tests.core.conftest import wait_until

RECORD = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 1}


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meter.sender"]


@pytest.fixture
def short_spells(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spell of failures worth a line once it lasts 0.3 s (10 s in production)."""
    monkeypatch.setattr(sender_module, "_SPELL_WORTH_A_LINE", 0.3)


@pytest.mark.usefixtures("short_spells")
def test_the_end_of_an_outage_is_told_with_what_was_held_back(
    backend: DevServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client: MeterClient = make_client(max_retries=50, backoff_cap=0.05)
    client.send(**RECORD)  # (the customer is cached: only produce requests fail)
    caplog.set_level(logging.WARNING, logger="meter.sender")
    backend.set_fault("down")
    for _ in range(5):
        client.record(**RECORD)
        time.sleep(0.1)
    wait_until(lambda: client.stats()["retried"] >= 10)
    assert sum("retry" in line for line in _lines(caplog)) == 1  # (throttled: 10 s)
    backend.clear_fault()
    assert client.flush(timeout=10)
    lines = _lines(caplog)
    [back] = [n for n, line in enumerate(lines) if "takes events again" in line]
    assert "s of failed deliveries" in lines[back]
    held = lines[back + 1]
    assert "more times since the last line" in held and "retry" in held
    assert held.endswith("until the backend took events again)")
    assert len(backend.event_ids()) == 6


@pytest.mark.usefixtures("short_spells")
def test_a_blip_is_no_spell_and_the_throttle_keeps_counting(
    backend: DevServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # One produce request refused now and then (a flapping replica): no "again" line
    # after each, and the retries' lines stay throttled (68 lines in 10 s otherwise).
    client: MeterClient = make_client(max_retries=50, backoff_base=0.01, backoff_cap=0.01)
    client.send(**RECORD)
    caplog.set_level(logging.WARNING, logger="meter.sender")
    for _ in range(6):
        backend.set_fault("down", times=1)
        client.record(**RECORD)
        assert client.flush(timeout=10)
    assert len(backend.event_ids()) == 7
    lines = _lines(caplog)
    assert not [line for line in lines if "takes events again" in line]
    assert len(lines) == 1  # the first failure's line; the others are held back


def test_steady_refusals_do_not_hide_an_outage(
    backend: DevServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A tenant without an account is refused at each of its events: those lines share
    # no throttle with the outage that follows.
    client: MeterClient = make_client(max_retries=0)
    client.send(**RECORD)
    backend.remove_customer("ghost")
    caplog.set_level(logging.WARNING, logger="meter.sender")
    client.record(**{**RECORD, "tenant_id": "ghost"})
    wait_until(lambda: client.stats()["failed"] == 1)
    backend.set_fault("down")
    client.record(**RECORD)
    wait_until(lambda: client.stats()["failed"] == 2)
    lines = [line for line in _lines(caplog) if "not delivered" in line]
    assert len(lines) == 2
    assert "no customer account" in lines[0] and "HTTP 503" in lines[1]


def test_close_tells_what_the_throttles_held_back(
    backend: DevServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client: MeterClient = make_client(max_retries=50, backoff_cap=0.05)
    client.send(**RECORD)
    caplog.set_level(logging.WARNING, logger="meter.sender")
    backend.set_fault("down")
    client.record(**RECORD)
    wait_until(lambda: client.stats()["retried"] >= 5)
    client.close(timeout=0)
    assert any(line.endswith("; until close)") for line in _lines(caplog))


def test_one_event_reads_as_one(
    backend: DevServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client: MeterClient = make_client(max_retries=1, backoff_cap=0.05)
    client.send(**RECORD)
    caplog.set_level(logging.WARNING, logger="meter.sender")
    backend.set_fault("down")
    client.record(**RECORD)
    wait_until(lambda: client.stats()["failed"] == 1)
    lines = _lines(caplog)
    assert any(line.startswith("delivery of 1 event failed (") for line in lines), lines
    assert any(line.startswith("1 usage event not delivered, ") for line in lines), lines


def test_counted_agrees_with_one() -> None:
    from meter_core.wording import counted

    assert counted(1, "usage events") == "1 usage event"
    assert counted(0, "usage events") == "0 usage events"
    assert counted(2, "events", "are") == "2 events are"
    assert counted(1, "events", "stay") == "1 event stays"
