"""Retry policy: when to try again, and how long to wait first.

:class:`RetryPolicy` is an immutable value; the backoff is exponential with *full jitter*
(a uniform draw between 0 and ``min(cap, base * 2**(attempt-1))``), which spreads the
retries of many processes after an outage instead of having them hit the backend at once.
A server's ``Retry-After`` is a floor on the delay.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from meter_core.errors import ConfigurationError

__all__ = ["MAX_BACKOFF", "MAX_RETRY_AFTER", "RetryPolicy", "parse_retry_after"]

#: A Retry-After longer than this is taken as this (a broken header must not stall us).
MAX_RETRY_AFTER = 300.0
_HEADER_PARSER = Retry(total=0)
#: The largest backoff_base or backoff_cap (a day, as the client options): no wait or
#: time computed from them overflows.
MAX_BACKOFF = 86_400.0


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

    Checked here: ``max_retries`` an int >= 0, ``backoff_base`` and ``backoff_cap``
    numbers of seconds (not bools) from 0 to :data:`MAX_BACKOFF`, with ``backoff_cap >=
    backoff_base``; a bad value raises :class:`~meter_core.ConfigurationError` (a
    ``ValueError``) naming it.
    """

    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0

    def __post_init__(self) -> None:
        retries = self.max_retries
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise ConfigurationError(f"RetryPolicy: max_retries must be an int, got {retries!r}")
        if retries < 0:
            raise ConfigurationError(
                f"RetryPolicy: max_retries must not be negative, got {retries!r}"
            )
        for name in ("backoff_base", "backoff_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigurationError(
                    f"RetryPolicy: {name} must be a number of seconds, got {value!r}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigurationError(f"RetryPolicy: {name} must be finite, got {value!r}")
            if value < 0:
                raise ConfigurationError(f"RetryPolicy: {name} must not be negative, got {value!r}")
            if value > MAX_BACKOFF:
                raise ConfigurationError(
                    f"RetryPolicy: {name} must be at most {MAX_BACKOFF:g} seconds (a day), "
                    f"got {value!r}"
                )
        if self.backoff_cap < self.backoff_base:
            raise ConfigurationError(
                f"RetryPolicy: backoff_cap must be >= backoff_base ({self.backoff_base!r}), "
                f"got {self.backoff_cap!r}"
            )

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
