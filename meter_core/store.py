"""The failure-store protocol: where events go when they cannot be delivered now.

A store keeps events by ``event_id`` (storing one twice keeps one row) with a status:

- ``queued``: written by ``record()`` in durable mode, not tried yet;
- ``failed``: tried and failed; ``attempts``, ``last_error`` and ``next_attempt_at`` say
  how often, why, and when it is due again (events the client stores are due at once);
- ``delivered`` / ``discarded``: done (a store may delete such rows instead).

Workers take due events with :meth:`FailureStore.claim`, which leases them: until the
lease ends no other claim returns them, so two workers never send the same event at the
same time. A worker that dies leaves its lease to expire, and the events become due again.

meter_core ships :class:`~meter_core.SQLiteSpool`; the Django app implements the same
protocol with its models. :class:`MemoryFailureStore` is the client's fallback when no
store is configured: bounded, and it counts and logs what it has to drop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meter_core.errors import ConfigurationError
from meter_core.events import UsageEvent
from meter_core.usage import LogThrottle

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "FailureStore",
    "MemoryFailureStore",
    "StoredEvent",
]

logger = logging.getLogger("meter.store")

QUEUED = "queued"
FAILED = "failed"
DELIVERED = "delivered"
DISCARDED = "discarded"
#: How long a claim keeps events from other workers, by default.
DEFAULT_LEASE_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as a store holds it."""

    event: UsageEvent
    status: str
    attempts: int
    last_error: str
    next_attempt_at: float  # epoch seconds


@runtime_checkable
class FailureStore(Protocol):
    """Durable home of events that are not delivered yet. Implementations are safe to use
    from several threads; SQLiteSpool and the Django store also from several processes."""

    def store(
        self,
        events: Sequence[UsageEvent],
        *,
        error: str = "",
        attempts: int = 0,
        next_attempt_at: float | None = None,
    ) -> None:
        """Keep ``events``: as ``queued`` when ``error`` is empty, else as ``failed`` with
        that reason. Due at ``next_attempt_at`` (epoch seconds, default now). An event
        already stored is updated, never duplicated; a delivered one is left alone."""
        ...

    def claim(
        self,
        limit: int,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int | None = None,
        tenant_id: str | None = None,
        meter_id: str | None = None,
    ) -> list[StoredEvent]:
        """Lease up to ``limit`` due events (queued or failed, ``next_attempt_at`` passed,
        not leased, fewer than ``max_attempts`` attempts), oldest due first. No event is
        returned to two claims whose leases overlap."""
        ...

    def mark_delivered(self, event_ids: Sequence[str]) -> None:
        """The backend has these events: they are never handed out again."""
        ...

    def mark_failed(self, event_ids: Sequence[str], *, error: str, next_attempt_at: float) -> None:
        """Another attempt failed: count it, keep the reason, release the lease, and make
        the events due again at ``next_attempt_at``."""
        ...

    def release(self, event_ids: Sequence[str]) -> None:
        """Give leased events back untouched (a dry run, a shutdown)."""
        ...

    def counts(self) -> dict[str, dict[str, int]]:
        """Events by status, and by status then last error: ``{"by_status": {...},
        "by_reason": {"failed: <error>": n, ...}}``."""
        ...


class MemoryFailureStore:
    """A bounded, process-local :class:`FailureStore`; the client's fallback.

    It holds at most ``max_events`` undelivered events. When full, the oldest event is
    dropped, counted in :attr:`dropped` and logged at ERROR (billing data is being lost).
    ``max_events=0`` keeps nothing: every event stored is dropped that way (what a
    client built with ``max_failed_in_memory=0`` asks for). Another value that is not
    an int >= 0 raises :class:`~meter_core.ConfigurationError` here.
    Nothing survives the process: configure a real store in production.
    """

    def __init__(self, max_events: int = 10_000) -> None:
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
            raise ConfigurationError(
                f"MemoryFailureStore(max_events): must be an int >= 0, got {max_events!r}"
            )
        self.max_events = max_events
        self.dropped = 0
        self._lock = threading.Lock()
        self._events: OrderedDict[str, StoredEvent] = OrderedDict()
        self._leases: dict[str, float] = {}
        self._delivered = 0
        # (throttled: with the store full, every event that fails drops one, and an
        # outage of many tenants without a customer account fails them one by one)
        self._drop_log = LogThrottle(logger, interval=10.0)

    def __len__(self) -> int:
        return len(self._events)

    def store(
        self,
        events: Sequence[UsageEvent],
        *,
        error: str = "",
        attempts: int = 0,
        next_attempt_at: float | None = None,
    ) -> None:
        self.store_counted(events, error=error, attempts=attempts, next_attempt_at=next_attempt_at)

    def store_counted(
        self,
        events: Sequence[UsageEvent],
        *,
        error: str = "",
        attempts: int = 0,
        next_attempt_at: float | None = None,
    ) -> int:
        """:meth:`store`, returning how many events this call dropped to make room
        (counted apart from others that a logging handler may cause meanwhile)."""
        due = time.time() if next_attempt_at is None else next_attempt_at
        status = FAILED if error else QUEUED
        dropped: list[str] = []
        with self._lock:
            for event in events:
                self._events[event.event_id] = StoredEvent(event, status, attempts, error, due)
                self._events.move_to_end(event.event_id)
                while len(self._events) > self.max_events:
                    old_id, _ = self._events.popitem(last=False)
                    self._leases.pop(old_id, None)
                    dropped.append(old_id)
            self.dropped += len(dropped)
        if dropped:
            self._drop_log.log(
                logging.ERROR,
                "in-memory failure store is full (%d events): dropped %d undelivered events, "
                "first %s (dropped in all: %d); configure a failure store (e.g. SQLiteSpool) "
                "to keep them",
                self.max_events,
                len(dropped),
                dropped[0],
                self.dropped,
            )
        return len(dropped)

    def claim(
        self,
        limit: int,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int | None = None,
        tenant_id: str | None = None,
        meter_id: str | None = None,
        due_by: float | None = None,
    ) -> list[StoredEvent]:
        """See :meth:`FailureStore.claim`; ``due_by`` (epoch seconds, default now): the
        events due by then count as due (an event never due, ``next_attempt_at``
        infinite, is never claimed)."""
        now = time.time()
        due = now if due_by is None else due_by
        claimed: list[StoredEvent] = []
        with self._lock:
            for event_id, stored in self._events.items():
                if len(claimed) >= limit:
                    break
                if stored.next_attempt_at > due or self._leases.get(event_id, 0) > now:
                    continue
                if max_attempts is not None and stored.attempts >= max_attempts:
                    continue
                if tenant_id is not None and stored.event.tenant_id != tenant_id:
                    continue
                if meter_id is not None and stored.event.meter_id != meter_id:
                    continue
                self._leases[event_id] = now + lease_seconds
                claimed.append(stored)
        return claimed

    def mark_delivered(self, event_ids: Sequence[str]) -> None:
        with self._lock:
            for event_id in event_ids:
                if self._events.pop(event_id, None) is not None:
                    self._delivered += 1
                self._leases.pop(event_id, None)

    def mark_failed(
        self,
        event_ids: Sequence[str],
        *,
        error: str,
        next_attempt_at: float,
        to_back: bool = False,
    ) -> None:
        """See :meth:`FailureStore.mark_failed`. ``to_back``: the events also go behind
        the others, so that claims, which take the oldest first, come to the others
        before them again (and a full store drops them after the others)."""
        with self._lock:
            for event_id in event_ids:
                stored = self._events.get(event_id)
                if stored is not None:
                    self._events[event_id] = StoredEvent(
                        stored.event, FAILED, stored.attempts + 1, error, next_attempt_at
                    )
                    if to_back:
                        self._events.move_to_end(event_id)
                self._leases.pop(event_id, None)

    def release(self, event_ids: Sequence[str]) -> None:
        with self._lock:
            for event_id in event_ids:
                self._leases.pop(event_id, None)

    def counts(self) -> dict[str, dict[str, int]]:
        by_status: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        with self._lock:
            for stored in self._events.values():
                by_status[stored.status] = by_status.get(stored.status, 0) + 1
                reason = (
                    f"{stored.status}: {stored.last_error}" if stored.last_error else stored.status
                )
                by_reason[reason] = by_reason.get(reason, 0) + 1
            if self._delivered:
                by_status[DELIVERED] = self._delivered
        return {"by_status": by_status, "by_reason": by_reason}

    def discard(self, event_ids: Sequence[str]) -> int:
        """Forget these events (moved elsewhere); not counted as delivered. Returns how
        many were still held (one evicted meanwhile by a full store is not)."""
        removed = 0
        with self._lock:
            for event_id in event_ids:
                if self._events.pop(event_id, None) is not None:
                    removed += 1
                self._leases.pop(event_id, None)
        return removed

    def events(self) -> list[StoredEvent]:
        """A snapshot of what is held, oldest first."""
        with self._lock:
            return list(self._events.values())
