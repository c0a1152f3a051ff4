"""LogThrottle: one line per interval for a condition that repeats on every request."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import pytest

from meter_core import ConfigurationError, LogThrottle


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


def test_a_throttle_without_a_logger_is_refused_when_built_not_at_its_first_line() -> None:
    with pytest.raises(ConfigurationError) as caught:
        LogThrottle(None)  # type: ignore[arg-type]
    assert str(caught.value) == "LogThrottle(logger): must be a logging.Logger, got None"
    with pytest.raises(ConfigurationError, match=r"LogThrottle\(logger\)"):
        LogThrottle("meter.test")  # type: ignore[arg-type]


@pytest.mark.parametrize("interval", [float("nan"), float("inf"), -1, -0.5, "60", True, None])
def test_a_bad_interval_is_refused_naming_it(interval: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        LogThrottle(logging.getLogger("meter.test.throttle"), interval)
    assert str(caught.value) == (
        f"LogThrottle(interval): must be a finite number of seconds >= 0, got {interval!r}"
    )


def test_an_interval_of_zero_logs_every_occurrence(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("meter.test.throttle")
    throttle = LogThrottle(logging.LoggerAdapter(logger, {}), interval=0)
    with caplog.at_level(logging.WARNING, logger="meter.test.throttle"):
        for n in range(3):
            throttle.log(logging.WARNING, "line %d", n)
    assert [r.getMessage() for r in caplog.records] == ["line 0", "line 1", "line 2"]


def test_the_line_logged_carries_the_traceback_and_says_it_was_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle = LogThrottle(logging.getLogger("meter.test"), interval=60)
    try:
        raise ZeroDivisionError("bug")
    except ZeroDivisionError as exc:
        failure = exc
    with caplog.at_level(logging.ERROR, logger="meter"):
        assert throttle.log(logging.ERROR, "failed: %s", "x", exc_info=failure) is True
        assert throttle.log(logging.ERROR, "failed: %s", "x", exc_info=failure) is False
    [record] = caplog.records
    assert record.exc_info is not None and record.exc_info[1] is failure


def test_kinds_of_a_condition_are_throttled_apart(caplog: pytest.LogCaptureFixture) -> None:
    # (a view failing at every request must not hide another's new failure for a minute)
    throttle = LogThrottle(logging.getLogger("meter.test"), interval=60)
    with caplog.at_level(logging.ERROR, logger="meter"):
        for _ in range(5):
            throttle.log(logging.ERROR, "failed: %s", "a", key=("view-a", ZeroDivisionError))
        assert throttle.log(logging.ERROR, "failed: %s", "b", key=("view-b", KeyError))
        assert not throttle.log(logging.ERROR, "failed: %s", "b", key=("view-b", KeyError))
    assert [r.getMessage() for r in caplog.records] == ["failed: a", "failed: b"]
    assert throttle.count == 7


def test_kinds_past_the_bound_share_one_throttle_and_never_flood(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle = LogThrottle(logging.getLogger("meter.test"), interval=60)
    with caplog.at_level(logging.ERROR, logger="meter"):
        for _ in range(10):
            for kind in range(300):
                throttle.log(logging.ERROR, "failed: %s", kind, key=kind)
        throttle.log(logging.ERROR, "unhashable", key=["a"])
    # one line for each of the first 256 kinds, one for all the others together
    assert len(caplog.records) == 257
    assert throttle.count == 3001


def test_the_line_of_kinds_past_the_bound_says_it_counts_other_kinds_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # it names the latest kind, with a count of all the kinds that share its slot
    logger = logging.getLogger("meter.test.throttle.shared")
    throttle = LogThrottle(logger, interval=0.2)
    with caplog.at_level(logging.WARNING, logger="meter.test.throttle.shared"):
        for kind in range(260):
            throttle.log(logging.WARNING, "failure of kind %d", kind, key=kind)
        time.sleep(0.25)
        throttle.log(logging.WARNING, "failure of kind %d", 999, key=999)
    assert caplog.records[-1].getMessage() == (
        "failure of kind 999 (4 times in the last 0.2s, this and other kinds)"
    )


def test_the_count_after_a_quiet_spell_says_how_long_it_spans(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Occurrences held back, then none for a while: the next line's count spans the
    # time since the last line, not the interval (an outage's failures counted in the
    # next outage's first line once read as "28 times in the last 10s").
    logger = logging.getLogger("meter.test.throttle.quiet")
    throttle = LogThrottle(logger, interval=1)
    with caplog.at_level(logging.WARNING, logger="meter.test.throttle.quiet"):
        throttle.log(logging.WARNING, "failed")
        throttle.log(logging.WARNING, "failed")
        time.sleep(2.6)
        throttle.log(logging.WARNING, "failed")
    assert caplog.records[-1].getMessage() == "failed (2 times in the last 3s)"


def test_a_line_for_several_occurrences_counts_their_events_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # "1 usage events not delivered (50 times)" read as one event, not the 1,150 it was
    logger = logging.getLogger("meter.test.throttle.events")
    throttle = LogThrottle(logger, interval=0.2)
    with caplog.at_level(logging.WARNING, logger="meter.test.throttle.events"):
        for n in (3, 40, 7):
            throttle.log(logging.WARNING, "%d events failed", n, events=n)
        time.sleep(0.25)
        throttle.log(logging.WARNING, "%d events failed", 1, events=1)
        throttle.log(logging.WARNING, "%d events failed", 1, events=1)
        time.sleep(0.25)
        throttle.log(logging.WARNING, "%d events failed", 2, events=2)
    assert [r.getMessage() for r in caplog.records] == [
        "3 events failed",
        "1 events failed (3 times in the last 0.2s, 48 events in all)",
        "2 events failed (2 times in the last 0.2s, 3 events in all)",
    ]


def test_what_was_held_back_is_told_when_asked_and_the_interval_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("meter.test.throttle.held")
    throttle = LogThrottle(logger, interval=60)
    with caplog.at_level(logging.INFO, logger="meter.test.throttle.held"):
        for n in range(4):
            throttle.log(logging.ERROR, "outage %d", n, key="outage", events=10)
        throttle.log(logging.WARNING, "no account", key="refused", events=1)
        assert throttle.report_held("until it ended") == 1  # (the refusal held nothing)
        assert throttle.report_held("again") == 0
        throttle.log(logging.ERROR, "outage %d", 9, key="outage", events=10)  # held back
        assert throttle.report_held("once more") == 1
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "outage 0"),
        (logging.WARNING, "no account"),
        (
            logging.ERROR,
            "outage 3 (3 more times since the last line, 30 events in all; until it ended)",
        ),
        (logging.ERROR, "outage 9 (1 more time since the last line, 10 events in all; once more)"),
    ]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_child_forked_while_a_throttle_was_taken_still_logs() -> None:
    # A thread of the parent was inside log() at the fork: the child inherits the lock
    # taken, and without a new one it would hang at its first line.
    throttle = LogThrottle(logging.getLogger("meter.test.fork"), interval=0)
    throttle._lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                code = 0 if throttle.log(logging.DEBUG, "from the child") else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung on the throttle's lock")
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        throttle._lock.release()
