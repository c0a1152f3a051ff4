"""LogThrottle: one line per interval for a condition that repeats on every request."""

from __future__ import annotations

import logging
import time

import pytest

from meter_core import LogThrottle


def test_one_line_per_interval_with_the_count_of_what_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("meter.test.throttle")
    throttle = LogThrottle(logger, interval=0.2)
    with caplog.at_level(logging.WARNING, logger="meter.test.throttle"):
        for n in range(5):
            throttle.log(logging.WARNING, "request %d not metered", n)
        time.sleep(0.25)
        throttle.log(logging.WARNING, "request %d not metered", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "request 0 not metered",  # a single occurrence: no count
        "request 5 not metered (5 times in the last 0.2s)",
    ]
    assert throttle.count == 6
