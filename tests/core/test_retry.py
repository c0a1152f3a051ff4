"""Retry policy: exponential backoff with full jitter, Retry-After as a floor."""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import pytest

from meter_core import ConfigurationError, RetryPolicy
from meter_core.retry import MAX_RETRY_AFTER, parse_retry_after


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=10, backoff_base=0.5, backoff_cap=4.0)
    top = [policy.backoff(n, rng=lambda: 1.0) for n in range(1, 7)]
    assert top == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_is_full_jitter_between_zero_and_the_ceiling() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=8.0)
    assert policy.backoff(3, rng=lambda: 0.0) == 0.0
    assert policy.backoff(3, rng=lambda: 0.25) == 1.0
    draws = {policy.backoff(3) for _ in range(50)}
    assert len(draws) > 1
    assert all(0 <= d <= 4.0 for d in draws)


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(backoff_base=0.1, backoff_cap=1.0)
    assert policy.backoff(1, retry_after=7.0, rng=lambda: 0.5) == 7.0


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert RetryPolicy(backoff_cap=30).backoff(10_000, rng=lambda: 1.0) == 30


def test_can_retry_counts_retries_after_the_first_attempt() -> None:
    policy = RetryPolicy(max_retries=2)
    assert [policy.can_retry(n) for n in (1, 2, 3)] == [True, True, False]


def test_policy_is_immutable_and_validated() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_retries = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(max_retries=-1)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("5", 5.0), ("0", 0.0), (None, None), ("", None), ("soon", None), ("99999", MAX_RETRY_AFTER)],
)
def test_parse_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    import time

    seconds = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert seconds is not None
    assert 25 <= seconds <= 31


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backoff_base": float("nan")}, "RetryPolicy: backoff_base must be finite, got nan"),
        ({"backoff_cap": float("nan")}, "RetryPolicy: backoff_cap must be finite, got nan"),
        ({"backoff_cap": float("inf")}, "RetryPolicy: backoff_cap must be finite, got inf"),
        (
            {"backoff_base": 2.0, "backoff_cap": 1.0},
            "RetryPolicy: backoff_cap must be >= backoff_base (2.0), got 1.0",
        ),
        ({"backoff_cap": 0.1}, "RetryPolicy: backoff_cap must be >= backoff_base (0.5), got 0.1"),
        ({"max_retries": True}, "RetryPolicy: max_retries must be an int, got True"),
        ({"max_retries": 2.0}, "RetryPolicy: max_retries must be an int, got 2.0"),
        ({"backoff_base": True}, "RetryPolicy: backoff_base must be a number of seconds, got True"),
        ({"backoff_cap": "30"}, "RetryPolicy: backoff_cap must be a number of seconds, got '30'"),
        ({"backoff_base": -0.5}, "RetryPolicy: backoff_base must not be negative, got -0.5"),
        (
            {"backoff_cap": 1e300},
            "RetryPolicy: backoff_cap must be at most 86400 seconds (a day), got 1e+300",
        ),
    ],
)
def test_policy_refuses_values_that_would_fail_later_naming_them(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RetryPolicy(**options)
    assert str(caught.value) == message


def test_policy_accepts_the_edges() -> None:
    assert RetryPolicy(max_retries=0, backoff_base=0, backoff_cap=0).backoff(3) == 0
    assert RetryPolicy(backoff_base=1, backoff_cap=1).backoff(5, rng=lambda: 1.0) == 1
