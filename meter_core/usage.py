"""Per-request helpers shared by the framework adapters: usage a handler adds itself,
and a log throttle for conditions that can repeat on every request."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Hashable, Mapping
from typing import Any

from meter_core.catalog import is_known_meter
from meter_core.errors import ConfigurationError, InvalidEvent
from meter_core.events import MAX_USAGE, freeze_metadata, validate_identifier

__all__ = ["LogThrottle", "RequestUsage"]

_OTHER_KINDS = object()  # the slot of kinds past LogThrottle's bound, or unhashable


class RequestUsage:
    """Usage added by a handler during one request (``request.meter.add(...)``).

    Entries are recorded by the adapter after the response, only if it succeeded.
    :meth:`add` checks its arguments at once and raises InvalidEvent for bad ones: a
    handler's mistake shows in development instead of vanishing.
    """

    __slots__ = ("_allow_unknown", "entries")

    def __init__(self, *, allow_unknown_meters: bool = False) -> None:
        self._allow_unknown = allow_unknown_meters
        self.entries: list[tuple[str, int, Mapping[str, str]]] = []

    def add(self, meter_id: str, n: int = 1, *, metadata: Mapping[str, str] | None = None) -> None:
        """Add ``n`` units of ``meter_id`` to this request's usage. ``metadata`` is
        checked and copied here (a later change to the caller's dict is not billed)."""
        validate_identifier("meter_id", meter_id)
        if not self._allow_unknown and not is_known_meter(meter_id):
            raise InvalidEvent("meter_id", f"unknown meter {meter_id!r}")
        if type(n) is not int or not 0 <= n <= MAX_USAGE:
            raise InvalidEvent("total_usage", f"must be an int from 0 to {MAX_USAGE}, got {n!r}")
        self.entries.append((meter_id, n, freeze_metadata(metadata)))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"RequestUsage({self.entries!r})"


class LogThrottle:
    """Logs a repeating condition at most once per ``interval`` seconds, with the count
    of occurrences since the last line when there was more than one. Thread-safe;
    :attr:`count` is the total.

    ``key`` (optional, in :meth:`log`) throttles kinds of the condition apart (an
    exception type, a meter): a new kind is logged at once rather than hidden for the
    interval by another. At most 256 kinds are tracked apart; later ones share one
    throttle.

    ``logger`` must be a :class:`logging.Logger` (or a ``LoggerAdapter``), ``interval``
    a finite number of seconds >= 0 (0 logs every occurrence); anything else raises
    :class:`~meter_core.ConfigurationError` here, not at the first line logged."""

    _MAX_KEYS = 256

    def __init__(
        self, logger: logging.Logger | logging.LoggerAdapter[Any], interval: float = 60.0
    ) -> None:
        if not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
            raise ConfigurationError(
                f"LogThrottle(logger): must be a logging.Logger, got {logger!r}"
            )
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or (isinstance(interval, float) and not math.isfinite(interval))
            or interval < 0
        ):
            raise ConfigurationError(
                f"LogThrottle(interval): must be a finite number of seconds >= 0, got {interval!r}"
            )
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._slots: dict[Hashable, _Slot] = {}
        self.count = 0
        _THROTTLES.add(self)

    def _after_fork(self) -> None:
        # A new lock, not the inherited one: a thread of the parent may have held it
        # (the child would then hang at its first line), as logging does for handlers.
        self._lock = threading.Lock()

    def log(
        self,
        level: int,
        message: str,
        *args: Any,
        exc_info: BaseException | None = None,
        key: Hashable = None,
        events: int = 0,
    ) -> bool:
        """Count this occurrence; log it unless a line of the same ``key`` was logged less
        than ``interval`` seconds ago. ``exc_info``: the traceback goes with the line that
        is logged (an error reporter gets one per interval). ``events``: how many events
        this occurrence is about; a line that stands for several occurrences also says
        how many events they were about in all. True when a line was logged."""
        with self._lock:
            self.count += 1
            try:
                slot = self._slots.get(key)
            except TypeError:  # an unhashable kind: counted with the other kinds
                key, slot = _OTHER_KINDS, self._slots.get(_OTHER_KINDS)
            if slot is None:
                if len(self._slots) >= self._MAX_KEYS:
                    # Full: a new kind shares one slot with every kind after it (bounded
                    # memory, and never a line per occurrence however many kinds come).
                    key, slot = _OTHER_KINDS, self._slots.get(_OTHER_KINDS)
                if slot is None:
                    slot = self._slots[key] = _Slot()
            slot.held += 1
            slot.events += events
            now = time.monotonic()
            if now - slot.logged_at < self._interval:
                slot.last = (level, message, args)  # (said by report_held(), if no line comes)
                return False
            since, total = slot.held, slot.events
            elapsed = now - slot.logged_at  # (since the last line: longer than the interval
            slot.logged_at, slot.held, slot.events, slot.last = now, 0, 0, None  # after a
            # quiet spell, which the count spans too)
        if since == 1:
            self._logger.log(level, message, *args, exc_info=exc_info)
        else:
            self._logger.log(
                level,
                # (the slot shared by kinds past the bound counts them all: say so)
                "%s (%d times in the last %s%s%s)",
                message % args,
                since,
                f"{self._interval:g}s" if elapsed < 2 * self._interval else _span(elapsed),
                f", {total:,} event{'s' if total != 1 else ''} in all" if total > events else "",
                ", this and other kinds" if key is _OTHER_KINDS else "",
                exc_info=exc_info,
            )
        return True

    def report_held(self, note: str) -> int:
        """Log, for each kind, the occurrences held back since its last line (the last of
        them, with their count), and forget them: what an interval would otherwise keep
        to itself when the condition has ended (the backend is back, the client closes).
        Each interval still runs from its kind's last line. ``note`` says why, in the
        line. Returns the number of lines logged."""
        with self._lock:
            held = []
            for key, slot in self._slots.items():
                if slot.last is not None:
                    held.append((key, slot.last, slot.held, slot.events))
                    # (the interval still runs from the last line: a condition that
                    # comes back at once is not logged at each occurrence)
                    slot.held, slot.events, slot.last = 0, 0, None
        for key, (level, message, args), count, events in held:
            self._logger.log(
                level,
                "%s (%d more %s since the last line%s%s; %s)",
                message % args,
                count,
                "time" if count == 1 else "times",
                # (not when each occurrence stood for one event: the count says it)
                f", {events:,} events in all" if events > count else "",
                ", this and other kinds" if key is _OTHER_KINDS else "",
                note,
            )
        return len(held)


class _Slot:
    """What a LogThrottle knows of one kind: when it last logged a line, and the
    occurrences held back since (their number, their events, the last of them)."""

    __slots__ = ("events", "held", "last", "logged_at")

    def __init__(self) -> None:
        self.logged_at = float("-inf")
        self.held = 0
        self.events = 0
        self.last: tuple[int, str, tuple[Any, ...]] | None = None


_THROTTLES: weakref.WeakSet[LogThrottle] = weakref.WeakSet()


def _renew_throttle_locks() -> None:
    for throttle in list(_THROTTLES):
        throttle._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_throttle_locks)


def _span(seconds: float) -> str:
    """A duration for a log line: ``36s``, ``12 min``, ``3.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
