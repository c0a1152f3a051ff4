"""Delivery counters of a client, readable at any time from any thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["DeliveryStats"]


@dataclass
class DeliveryStats:
    """Counters since the client was created (in this process).

    - ``recorded``: events accepted by ``record()`` (each call that returned without an
      error), those dropped at once included (a full queue, ``before_send``); a queued
      event is counted when the sender takes it off the queue, and :meth:`snapshot` adds
      those still queued;
    - ``sent``: events the backend confirmed;
    - ``retried``: event retries scheduled (one event retried twice counts 2);
    - ``failed``: events that failed for good (non-retriable, or out of retries), those
      kept in the in-memory list included;
    - ``stored``: events written to the failure store (failed, spilled from a full queue
      or left at close), a count of writes, not of what the store holds now: an event
      spilled and then sent from the store counts in ``stored`` and in ``sent``. Not
      counted: a durable event's own write at ``record()``, and events kept in the
      in-memory list when there is no store or it fails (``failed_in_memory``);
    - ``dropped``: events lost: a full queue with no store (or a failing one) and
      ``before_send`` returning None (both also in ``recorded``), or a full in-memory
      failure list (those also in ``failed``); each also logged. With nothing dropped
      (and none ``resent``), ``recorded`` = ``sent`` + ``failed`` + the events still
      owed (queued, in flight, waiting for a retry, or spilled to the store);
    - ``resent``: events of the in-memory failure list (no store: their retries ran
      out on a retriable failure) that the sender resent later, with success; they count
      in ``failed`` and in ``sent`` too, so with nothing dropped ``recorded`` =
      ``sent`` - ``resent`` + ``failed`` + the events still owed;
    - ``batches``: produce requests made;
    - ``last_error``: the text of the latest delivery error, or None.
    """

    recorded: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    stored: int = 0
    dropped: int = 0
    resent: int = 0
    batches: int = 0
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Add to counters atomically: ``stats.add(sent=10, batches=1)``."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    @property
    def lock(self) -> threading.Lock:
        """The lock of the counters. The sender holds it while it takes events off its
        queue and counts them as recorded, so that :meth:`snapshot` sees each queued
        event exactly once (in the queue or in the count) without the caller's path
        taking a lock for every event."""
        return self._lock

    def error(self, text: str) -> None:
        self.last_error = text

    def snapshot(self, queued: Callable[[], int] | None = None) -> dict[str, Any]:
        """The counters; ``queued`` gives the events accepted but not yet taken off the
        queue (counted in ``recorded``)."""
        with self._lock:
            data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
            if queued is not None:
                data["recorded"] += queued()
            return data
