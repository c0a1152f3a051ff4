"""Retry policy: when to try again, and how long to wait first.

:class:`RetryPolicy` is an immutable value; the backoff is exponential with *full jitter*
(a uniform draw between 0 and ``min(cap, base * 2**(attempt-1))``), which spreads the
retries of many processes after an outage instead of having them hit the backend at once.
A server's ``Retry-After`` is a floor on the delay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

__all__ = ["MAX_RETRY_AFTER", "RetryPolicy", "parse_retry_after"]

#: A Retry-After longer than this is taken as this (a broken header must not stall us).
MAX_RETRY_AFTER = 300.0
_HEADER_PARSER = Retry(total=0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date),
    or None when absent or unreadable. Never negative, at most :data:`MAX_RETRY_AFTER`."""
    if not value:
        return None
    try:
        seconds: float = _HEADER_PARSER.parse_retry_after(value.strip())
    except (InvalidHeader, ValueError, OverflowError):
        return None
    return min(max(0.0, float(seconds)), MAX_RETRY_AFTER)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How retriable failures are retried.

    ``max_retries`` counts retries after the first attempt: an event is tried at most
    ``max_retries + 1`` times before it goes to the failure store.
    """

    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError(f"RetryPolicy values must not be negative: {self!r}")

    def can_retry(self, attempts: int) -> bool:
        """Whether an event that has failed ``attempts`` times may be tried again."""
        return attempts <= self.max_retries

    def backoff(
        self,
        attempt: int,
        *,
        retry_after: float | None = None,
        rng: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** min(62, max(0, attempt - 1)))
        delay = rng() * ceiling
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay
