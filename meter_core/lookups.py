"""Customer lookups of one delivery attempt, several at a time.

A sender that looked its new tenants up one after another could bill at most one new
tenant per lookup latency: about 30 a second against a lookup API 30 ms away. After a
restart (an empty customer cache), or as the cache's answers expire, a service with
many tenants would hold its events back for minutes, its queue filling meanwhile. The
tenants of an attempt that the cache does not hold are therefore looked up by a few
threads at once, bounded by what the transport allows (``lookup_concurrency``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from meter_core.customers import CustomerCache
from meter_core.errors import DeliveryError

__all__ = ["look_up_together", "lookup_concurrency"]

MAX_LOOKUP_CONCURRENCY = 16
"""The most lookups one attempt makes at once, whatever the transport allows."""


def lookup_concurrency(transport: object) -> int:
    """How many customer lookups ``transport`` takes at once: its ``lookup_concurrency``
    attribute (an int >= 1, at most :data:`MAX_LOOKUP_CONCURRENCY`), 1 for a transport
    without one (one at a time, as a transport written before this knew)."""
    value = getattr(transport, "lookup_concurrency", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return 1
    return min(value, MAX_LOOKUP_CONCURRENCY)


def look_up_together(
    tenants: Sequence[str],
    customers: CustomerCache,
    *,
    concurrency: int,
    out_of_time: Callable[[], bool],
) -> tuple[dict[str, Any], dict[str, DeliveryError]]:
    """Look ``tenants`` up through ``customers``, up to ``concurrency`` at a time (the
    calling thread is one of them). Returns the answers and the refusals (the lookup's
    DeliveryError: CustomerNotFound, or a failure) by tenant. A tenant whose lookup did
    not start because ``out_of_time()`` said so is in neither. Returns once every lookup
    it started has ended.

    Anything else raised in a lookup (KeyboardInterrupt in the calling thread, a
    BaseException from a custom transport in any of them) stops it: no lookup starts
    after it, and it is raised in the calling thread once those under way have ended.

    When no thread can be started (at interpreter exit on Python 3.12 and later), the
    calling thread looks every tenant up by itself."""
    answers: dict[str, Any] = {}
    refused: dict[str, DeliveryError] = {}
    pending = iter(tenants)
    take_lock = threading.Lock()
    halted: list[BaseException] = []  # what stopped the lookups, first first

    def work() -> None:
        while True:
            with take_lock:  # (asked first: no lookup starts after the deadline)
                tenant = None if halted or out_of_time() else next(pending, None)
            if tenant is None:
                return
            try:
                answers[tenant] = customers.get(tenant)
            except DeliveryError as exc:
                refused[tenant] = exc

    def help_out() -> None:
        try:
            work()
        except BaseException as exc:  # raised in the calling thread (below), not lost
            halted.append(exc)

    helpers: list[threading.Thread] = []
    for _ in range(min(concurrency, len(tenants)) - 1):
        helper = threading.Thread(target=help_out, name="meter-lookup", daemon=True)
        try:
            helper.start()
        except RuntimeError:  # no new thread at interpreter exit: this one does the rest
            break
        helpers.append(helper)
    try:
        work()
    except BaseException as exc:
        halted.append(exc)  # (the helpers take no more tenants)
        raise
    finally:
        # Waited for even if this thread was interrupted: the answers are read after.
        for helper in helpers:
            helper.join()
    if halted:
        raise halted[0]
    return answers, refused
