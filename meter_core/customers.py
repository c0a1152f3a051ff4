"""The customer-id cache in front of the lookup API.

A tenant's customer account changes rarely, so answers are cached for
``ttl`` seconds, and "no account" answers for a shorter ``negative_ttl``. When many
threads ask for the same uncached tenant at once, one lookup is made and the others wait
for its answer (single flight). Other failures (the lookup API down, a malformed reply)
are not answers to cache, but with ``failure_backoff`` a tenant whose lookup failed is
not looked up again before a delay that grows with its consecutive failures: the same
error is raised at once meanwhile. Without it, the sender's retries of many small groups
of events, each for its own tenant, looked the same tenants up several times a second
for as long as the API failed.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from meter_core.errors import BackendUnavailable, CustomerNotFound, DeliveryError, RateLimited

__all__ = ["CustomerCache"]

_MISSING = object()  # a cached "no account"
_UNSET = object()


class _Flight:
    __slots__ = ("customer", "done", "error", "stale")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.customer: Any = _UNSET  # (still _UNSET once done: the leader was interrupted)
        self.error: DeliveryError | None = None
        self.stale = False  # invalidated while it ran: its answer is not cached


class CustomerCache:
    """Thread-safe TTL cache of ``tenant_id -> customer id`` over a lookup function.

    ``lookup(tenant_id)`` returns the customer id (a non-blank str or an int) or raises
    CustomerNotFound / another DeliveryError; any other answer (None, a blank string)
    counts as "no account", so that no event is sent without a customer. At most
    ``max_entries`` tenants are kept (oldest dropped first).
    """

    def __init__(
        self,
        lookup: Callable[[str], Any],
        *,
        ttl: float = 300.0,
        negative_ttl: float = 30.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        wait_timeout: float = 60.0,
        failure_backoff: Callable[[int], float] | None = None,
    ) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._wait_timeout = wait_timeout
        # tenant -> (expires_at, customer id), oldest first: an OrderedDict, whose oldest
        # entry is dropped in constant time (taken from the front of a plain dict, each is
        # found past the slots of those dropped before it). "No account" answers
        # (_MISSING) are kept apart, in an order of their own: with one TTL each, both
        # orders are also orders of expiry, so every expired answer is found at a front.
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._missing: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._inflight: dict[str, _Flight] = {}
        # tenant -> (not before, consecutive failures, error) of a failed lookup
        self._failed: dict[str, tuple[float, int, DeliveryError]] = {}
        self._failure_backoff = failure_backoff
        self._lock = threading.Lock()
        self.lookups = 0

    def get(self, tenant_id: str) -> Any:
        """The customer id of ``tenant_id``, from the cache or one lookup.

        Raises CustomerNotFound (also from the negative cache) or the lookup's
        DeliveryError (also, with ``failure_backoff``, the last one while its tenant's
        lookups back off). Never holds the cache lock during the lookup.
        """
        entry = self._entries.get(tenant_id) or self._missing.get(tenant_id)
        if entry is not None and entry[0] > self._clock():
            return self._answer(tenant_id, entry[1])
        failed = self._failed.get(tenant_id)
        if failed is not None and failed[0] > self._clock():
            raise _copy_error(failed[2])
        with self._lock:
            flight = self._inflight.get(tenant_id)
            leader = flight is None
            if flight is None:
                flight = self._inflight[tenant_id] = _Flight()
                self.lookups += 1  # (under the lock: several threads look up at once)
        if leader:
            return self._lead(tenant_id, flight)
        if not flight.done.wait(self._wait_timeout):
            raise BackendUnavailable(f"customer lookup of {tenant_id!r} did not finish in time")
        if flight.error is not None:
            raise _copy_error(flight.error)
        if flight.customer is _UNSET:  # never "no customer": a retriable failure
            raise BackendUnavailable(f"customer lookup of {tenant_id!r} was interrupted")
        return flight.customer

    def holds(self, tenant_id: str) -> bool:
        """True when :meth:`get` would answer ``tenant_id`` without a lookup: from the
        cache (an account or "no account" not expired), or with the error of a failed
        lookup while the tenant's lookups back off."""
        entry = self._entries.get(tenant_id) or self._missing.get(tenant_id)
        if entry is not None and entry[0] > self._clock():
            return True
        failed = self._failed.get(tenant_id)
        return failed is not None and failed[0] > self._clock()

    def _lead(self, tenant_id: str, flight: _Flight) -> Any:
        # The flight's outcome is set before anything else can be interrupted (a signal
        # handler may raise anywhere); waiters of a flight left without one get a
        # retriable error.
        try:
            customer = _usable(tenant_id, self._lookup(tenant_id))
        except CustomerNotFound as exc:
            flight.error = exc
            self._put(tenant_id, _MISSING, self._negative_ttl, flight)
            raise
        except DeliveryError as exc:
            flight.error = exc
            self._note_failure(tenant_id, exc, flight)
            raise
        except Exception as exc:  # a broken lookup must not leave waiters hanging
            # retriable, like any failure that is not an answer of the backend
            flight.error = BackendUnavailable(f"customer lookup of {tenant_id!r} failed: {exc!r}")
            self._note_failure(tenant_id, flight.error, flight)
            raise flight.error from exc
        else:
            flight.customer = customer
            self._put(tenant_id, customer, self._ttl, flight)
            return customer
        finally:
            with self._lock:
                if self._inflight.get(tenant_id) is flight:  # (not if invalidated)
                    del self._inflight[tenant_id]
            flight.done.set()

    def _note_failure(self, tenant_id: str, error: DeliveryError, flight: _Flight) -> None:
        """With ``failure_backoff``: no lookup of ``tenant_id`` before the delay of its
        consecutive failures so far (an answer, "no account" too, ends the count)."""
        if self._failure_backoff is None or isinstance(error, RateLimited):
            return  # (a 429 says when to come back itself: the sender honours it)
        with self._lock:
            if flight.stale:
                return
            earlier = self._failed.get(tenant_id)
            count = 1 if earlier is None else earlier[1] + 1
            delay = self._failure_backoff(count)
            if len(self._failed) >= self._max_entries and tenant_id not in self._failed:
                now = self._clock()  # (bounded: expired spells go first, then any)
                for tenant in [t for t, f in self._failed.items() if f[0] <= now]:
                    del self._failed[tenant]
                if len(self._failed) >= self._max_entries:
                    del self._failed[next(iter(self._failed))]
            self._failed[tenant_id] = (self._clock() + delay, count, error)

    def _put(self, tenant_id: str, value: Any, ttl: float, flight: _Flight) -> None:
        with self._lock:
            if flight.stale:  # invalidate() came while the lookup ran: it may be outdated
                return
            self._failed.pop(tenant_id, None)  # (an answer ends a spell of failures)
            if ttl <= 0:
                return
            live, missing = self._entries, self._missing
            now = self._clock()
            # Expired answers are dropped from the fronts (the oldest first: constant time
            # for each, where a scan of the whole cache at each new tenant of a full one
            # made the sender a hundred times slower), then, while it is full, the oldest
            # "no account" answers (asked again, they cost a lookup; a live answer dropped
            # for them would cost one too, for a tenant that is billed), then live ones.
            for entries in (live, missing):
                while entries:
                    oldest = next(iter(entries.values()))
                    if oldest[0] > now:
                        break
                    entries.popitem(last=False)
            live.pop(tenant_id, None)  # (a tenant asked again makes no room for itself)
            missing.pop(tenant_id, None)
            while len(live) + len(missing) >= self._max_entries and (live or missing):
                (missing or live).popitem(last=False)
            (missing if value is _MISSING else live)[tenant_id] = (now + ttl, value)

    @staticmethod
    def _answer(tenant_id: str, value: Any) -> Any:
        if value is _MISSING:
            raise CustomerNotFound(f"no customer account for tenant {tenant_id!r} (cached)")
        return value

    def forget_failures(self) -> None:
        """End every tenant's lookup backoff: the next :meth:`get` of each looks it up
        (a client's last chance to deliver what it holds in memory, at close)."""
        with self._lock:
            self._failed.clear()

    def invalidate(self, tenant_id: str | None = None) -> None:
        """Forget one tenant's answer, or every answer (and the backoff of failed
        lookups). A lookup already under way for
        it still answers the events already waiting for it, but its answer is not
        cached, and the events that come from now on ask again."""
        with self._lock:
            if tenant_id is None:
                self._entries.clear()
                self._missing.clear()
                self._failed.clear()
                flights = list(self._inflight.values())
                self._inflight.clear()
            else:
                self._entries.pop(tenant_id, None)
                self._missing.pop(tenant_id, None)
                self._failed.pop(tenant_id, None)
                flight = self._inflight.pop(tenant_id, None)
                flights = [flight] if flight is not None else []
            for flight in flights:  # (a later get() starts a lookup of its own)
                flight.stale = True


def _usable(tenant_id: str, customer: Any) -> Any:
    """``customer`` if it can key a record: a str with a non-blank character or an int
    (not a bool); else CustomerNotFound (a custom lookup answering None for none)."""
    if (isinstance(customer, str) and customer and not customer.isspace()) or (
        isinstance(customer, int) and not isinstance(customer, bool)
    ):
        return customer
    raise CustomerNotFound(
        f"the customer lookup of tenant {tenant_id!r} gave no usable customer id: {customer!r}"
    )


def _copy_error(error: DeliveryError) -> DeliveryError:
    """A fresh exception for each waiting thread, so tracebacks do not interleave."""
    try:
        return copy.copy(error)
    except Exception:
        return error
