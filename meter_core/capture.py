"""In-process capture of recorded events, for tests (like Django's ``mail.outbox``).

While a :func:`capture_events` block is open, every event any client accepts (through
``record``, ``record_session``, ``send``, the compatibility functions, or the framework
adapters) is appended to the list it yields, whatever the client's transport does with it.
An event recorded through a client with a ``before_send`` hook is captured as the hook
leaves it, and not at all when the hook drops it: what would be sent (``send()`` does not
run the hook).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from meter_core.events import UsageEvent

__all__ = ["CapturedEvents", "capture_events"]

_lock = threading.Lock()
# Read without the lock on the hot path: an empty tuple costs one truth test.
_active: tuple[CapturedEvents, ...] = ()


class CapturedEvents(list[UsageEvent]):
    """The events captured so far, in order; helpers for assertions."""

    def for_meter(self, meter_id: str) -> list[UsageEvent]:
        return [e for e in self if e.meter_id == meter_id]

    def for_tenant(self, tenant_id: str) -> list[UsageEvent]:
        return [e for e in self if e.tenant_id == tenant_id]

    def total(self, meter_id: str, tenant_id: str | None = None) -> int:
        """Sum of ``total_usage`` for a meter (and tenant)."""
        return sum(
            e.total_usage or 0
            for e in self
            if e.meter_id == meter_id and (tenant_id is None or e.tenant_id == tenant_id)
        )


def active() -> tuple[CapturedEvents, ...]:
    return _active


def notify(event: UsageEvent) -> None:
    """Append ``event`` to every open capture. Thread-safe."""
    with _lock:
        for captured in _active:
            captured.append(event)


@contextmanager
def capture_events() -> Iterator[CapturedEvents]:
    """Collect every event accepted in this process while the block is open.

    Blocks may nest; each sees the events of its own span.
    """
    global _active
    captured = CapturedEvents()
    with _lock:
        _active = (*_active, captured)
    try:
        yield captured
    finally:
        with _lock:
            _active = tuple(c for c in _active if c is not captured)
