"""Usage events: the immutable, validated unit of billing data.

A :class:`UsageEvent` is checked completely when it is built, so anything that reaches a
queue, a store or the wire is well formed. Its ``event_id`` is made once, at creation,
and travels with the event through every retry and store: the backend uses it to drop
duplicates.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meter_core.catalog import is_known_meter
from meter_core.errors import InvalidEvent

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_KEY_LENGTH",
    "MAX_METADATA_VALUE_LENGTH",
    "MAX_USAGE",
    "UsageEvent",
    "freeze_metadata",
    "now_ms",
    "validate_identifier",
]

MAX_ID_LENGTH = 128
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 1024
# The largest signed 64-bit integer: what a backend consumer reads total_usage into. A
# larger value (an app bug) would make a record the billing pipeline cannot read.
MAX_USAGE = 2**63 - 1
# Plausible epoch-millisecond range (2000-01-01 .. 2100-01-01): rejects seconds and
# microseconds, the two usual unit mistakes, which fall far outside it.
MIN_EPOCH_MS = 946_684_800_000
MAX_EPOCH_MS = 4_102_444_800_000

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Characters no store can keep in text (PostgreSQL refuses NUL in text and JSON; a lone
# surrogate cannot be encoded as UTF-8), so they are refused where an event is built:
# taken in, such an event would fail every store write of the batch it is in.
_UNSTORABLE_CHARS = re.compile("[\x00\ud800-\udfff]")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_EMPTY_METADATA: Mapping[str, str] = MappingProxyType({})


def now_ms() -> int:
    """The current time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


_COUNTER_LIMIT = 1 << 48


class _EventIds:
    """Event ids, unique without a random draw per event.

    Each id is a UUID (RFC 9562 version 8, "custom"): 74 random bits drawn from
    ``os.urandom`` once per process, then a 48-bit counter that starts at a random
    offset. Two processes share a prefix with odds of about 1 in 10^22, and one process
    would need 2^47 events to wrap its counter (it then draws a new prefix). Formatting
    one id costs a counter step and one string format, a fraction of a ``uuid4()``: this
    runs on the request path for every event. Thread-safe (``next()`` on a counter is
    atomic, and prefix and counter are swapped together); after ``fork`` the child draws
    its own prefix, so parent and child never make the same id.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = self._draw()

    @staticmethod
    def _draw() -> tuple[str, Iterator[int]]:
        h = os.urandom(16).hex()
        variant = "89ab"[int(h[15], 16) & 3]  # RFC 9562 variant: the top bits are 10
        prefix = f"{h[:8]}-{h[8:12]}-8{h[12:15]}-{variant}{h[16:19]}-"
        return prefix, itertools.count(int(h[19:31], 16) >> 1)

    def renew(self) -> None:
        with self._lock:
            self.state = self._draw()

    def reset_after_fork(self) -> None:
        # A new lock, not the inherited one: a thread of the parent may have held it.
        self._lock = threading.Lock()
        self.state = self._draw()

    def new(self) -> str:
        prefix, counter = self.state
        n = next(counter)
        if n >= _COUNTER_LIMIT:
            self.renew()
            return self.new()
        return f"{prefix}{n:012x}"


_EVENT_IDS = _EventIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_EVENT_IDS.reset_after_fork)
_new_event_id = _EVENT_IDS.new


# Ids that passed validate_identifier. Tenants, devices and meters repeat from event to
# event, so most checks become one set lookup; bounded, and cleared when full.
_VALID_IDS: set[str] = set()
_MAX_VALID_IDS = 10_000
_DOT_SEGMENTS = frozenset({".", ".."})


def validate_identifier(name: str, value: object) -> str:
    """Check an id (tenant, device, meter): a non-empty str of at most 128 characters
    with no control characters nor lone surrogates, other than ``.`` and ``..``. Returns
    it; raises :class:`InvalidEvent` naming ``name``."""
    if type(value) is str and value in _VALID_IDS:
        return value
    if type(value) is not str:
        raise InvalidEvent(name, f"must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidEvent(name, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidEvent(name, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    if _CONTROL_CHARS.search(value):
        raise InvalidEvent(name, f"must not contain control characters: {value!r}")
    if _UNSTORABLE_CHARS.search(value):
        raise InvalidEvent(name, f"must not contain a lone surrogate: {value!r}")
    if value in _DOT_SEGMENTS:
        # In a lookup URL's path, "." or ".." would be resolved as a path step (by the
        # HTTP library or the server) and ask for another resource than this tenant's.
        raise InvalidEvent(name, f"must not be {value!r} (a path step in a lookup URL)")
    if len(_VALID_IDS) >= _MAX_VALID_IDS:
        _VALID_IDS.clear()
    _VALID_IDS.add(value)
    return value


def _usage_range_error(usage: int) -> str:
    if usage < 0:
        return f"must not be negative, got {usage}"
    return f"must be at most {MAX_USAGE} (a signed 64-bit integer), got {usage}"


def _validate_epoch_ms(name: str, value: object) -> int:
    if type(value) is not int:
        raise InvalidEvent(name, f"must be an int of epoch milliseconds, got {value!r}")
    if not MIN_EPOCH_MS <= value < MAX_EPOCH_MS:
        raise InvalidEvent(
            name,
            f"must be epoch milliseconds (between years 2000 and 2100), got {value!r}; "
            "seconds or microseconds are a unit mistake",
        )
    return value


def freeze_metadata(metadata: object) -> Mapping[str, str]:
    """A read-only copy of ``metadata`` once it is valid (None: empty); InvalidEvent
    naming what is wrong otherwise. Later changes to the caller's mapping do not reach it."""
    if metadata is None:
        return _EMPTY_METADATA
    if not isinstance(metadata, Mapping):
        raise InvalidEvent("metadata", f"must be a mapping of str to str, got {metadata!r}")
    if not metadata:
        return _EMPTY_METADATA
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidEvent(
            "metadata", f"must have at most {MAX_METADATA_KEYS} keys, got {len(metadata)}"
        )
    for key, value in metadata.items():
        if type(key) is not str:
            raise InvalidEvent("metadata", f"keys must be str, got {key!r}")
        if type(value) is not str:
            raise InvalidEvent("metadata", f"value of {key!r} must be a str, got {value!r}")
        if len(key) > MAX_METADATA_KEY_LENGTH:
            raise InvalidEvent(
                "metadata", f"key {key[:20]!r}... is over {MAX_METADATA_KEY_LENGTH} characters"
            )
        if len(value) > MAX_METADATA_VALUE_LENGTH:
            raise InvalidEvent(
                "metadata", f"value of {key!r} is over {MAX_METADATA_VALUE_LENGTH} characters"
            )
        if _UNSTORABLE_CHARS.search(key) or _UNSTORABLE_CHARS.search(value):
            raise InvalidEvent(
                "metadata",
                f"key or value of {key!r} holds a NUL character or a lone surrogate, which "
                "no store can keep",
            )
    return MappingProxyType(dict(metadata))


@dataclass(frozen=True, slots=True, init=False)
class UsageEvent:
    """One usage event, validated at construction and immutable afterwards.

    A *volume/performance* event has ``total_usage`` (an int >= 0). An *AI session*
    boundary event has exactly one of ``start_time`` / ``end_time`` and no usage.
    ``event_time`` defaults to now and ``event_id`` (when not given, or given as ``""``)
    to a new UUID; both are fixed for the event's life. ``meter_id`` must be in the
    catalog unless ``allow_unknown_meter``.

    Raises :class:`~meter_core.InvalidEvent` (a ``ValueError``) naming the bad field.
    """

    tenant_id: str
    device_id: str
    meter_id: str
    total_usage: int | None
    event_time: int
    metadata: Mapping[str, str]
    start_time: int | None
    end_time: int | None
    event_id: str

    def __init__(
        self,
        tenant_id: str,
        device_id: str,
        meter_id: str,
        total_usage: int | None = None,
        event_time: int | None = None,
        metadata: Mapping[str, str] | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        event_id: str = "",
        allow_unknown_meter: bool = False,
    ) -> None:
        # Written by hand (not generated): this runs on the caller's request path for
        # every event, and the common case (ids seen before, a catalog meter, no
        # session, no metadata) costs a few set and dict lookups.
        valid = _VALID_IDS
        if tenant_id not in valid:
            validate_identifier("tenant_id", tenant_id)
        if device_id not in valid:
            validate_identifier("device_id", device_id)
        if meter_id not in valid:
            validate_identifier("meter_id", meter_id)
        if not allow_unknown_meter and not is_known_meter(meter_id):
            raise InvalidEvent(
                "meter_id",
                f"unknown meter {meter_id!r}; use a catalog id (meter_core.METERS), "
                "register it with register_meter(), or allow unknown meters on the client",
            )
        if event_time is None:
            event_time = time.time_ns() // 1_000_000
        elif type(event_time) is not int or not MIN_EPOCH_MS <= event_time < MAX_EPOCH_MS:
            _validate_epoch_ms("event_time", event_time)
        if start_time is None and end_time is None:
            if type(total_usage) is not int:  # also rejects bool, a subclass of int
                raise InvalidEvent("total_usage", f"must be an int, got {total_usage!r}")
            if not 0 <= total_usage <= MAX_USAGE:
                raise InvalidEvent("total_usage", _usage_range_error(total_usage))
        else:
            if start_time is not None and end_time is not None:
                raise InvalidEvent(
                    "start_time", "a session event has exactly one of start_time / end_time"
                )
            if total_usage is not None:
                raise InvalidEvent("total_usage", "a session event carries no total_usage")
            if start_time is not None:
                _validate_epoch_ms("start_time", start_time)
            else:
                _validate_epoch_ms("end_time", end_time)
        if metadata is None or metadata is _EMPTY_METADATA:
            metadata = _EMPTY_METADATA
        else:
            metadata = freeze_metadata(metadata)
        if event_id == "":
            event_id = _new_event_id()
        elif type(event_id) is not str or not _UUID.match(event_id):
            if isinstance(event_id, (str, uuid.UUID)) and _is_uuid(str(event_id)):
                event_id = str(uuid.UUID(str(event_id)))
            else:
                raise InvalidEvent("event_id", f"must be a UUID string, got {event_id!r}")
        _SET_TENANT_ID(self, tenant_id)
        _SET_DEVICE_ID(self, device_id)
        _SET_METER_ID(self, meter_id)
        _SET_TOTAL_USAGE(self, total_usage)
        _SET_EVENT_TIME(self, event_time)
        _SET_METADATA(self, metadata)
        _SET_START_TIME(self, start_time)
        _SET_END_TIME(self, end_time)
        _SET_EVENT_ID(self, event_id)

    def __hash__(self) -> int:
        return hash(self.event_id)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # Pickle (and deepcopy) through to_dict(): the metadata mapping proxy cannot be
        # pickled itself. The copy keeps the event_id.
        return UsageEvent.from_dict, (self.to_dict(),)

    @property
    def is_session(self) -> bool:
        """True for an AI session boundary event (start or end)."""
        return self.start_time is not None or self.end_time is not None

    def record_value(self, customer_id: str) -> dict[str, Any]:
        """The Kafka record value, field for field and in meter-lib 0.1.0's order, followed
        by the fields this suite adds (``event_id``, ``tenant_id``, ``device_id``)."""
        value: dict[str, Any]
        # (most events have no metadata: {} then, as dict() of a mapping proxy, even an
        # empty one, costs several times more: this runs for every record sent)
        metadata = dict(self.metadata) if self.metadata else {}
        if self.start_time is None and self.end_time is None:
            value = {
                "meter_id": self.meter_id,
                "customer_id": customer_id,
                "total_usage": self.total_usage,
                "event_time": self.event_time,
                "metadata": metadata,
            }
        else:
            value = {
                "ai_event": True,
                "meter_id": self.meter_id,
                "customer_id": customer_id,
                "metadata": metadata,
            }
            if self.start_time is not None:
                value["start_time"] = self.start_time
            else:
                value["end_time"] = self.end_time
        value["event_id"] = self.event_id
        value["tenant_id"] = self.tenant_id
        value["device_id"] = self.device_id
        return value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, for stores; :meth:`from_dict` reverses it."""
        data: dict[str, Any] = {
            "event_id": self.event_id,
            "tenant_id": self.tenant_id,
            "device_id": self.device_id,
            "meter_id": self.meter_id,
            "event_time": self.event_time,
            "metadata": dict(self.metadata) if self.metadata else {},  # (see record_value)
        }
        if self.total_usage is not None:
            data["total_usage"] = self.total_usage
        if self.start_time is not None:
            data["start_time"] = self.start_time
        if self.end_time is not None:
            data["end_time"] = self.end_time
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UsageEvent:
        """Rebuild a stored event. The meter catalog is not consulted: the event was
        accepted when it was recorded, and the catalog of this process may differ."""
        return cls(
            tenant_id=data["tenant_id"],
            device_id=data["device_id"],
            meter_id=data["meter_id"],
            total_usage=data.get("total_usage"),
            event_time=data["event_time"],
            metadata=data.get("metadata") or _EMPTY_METADATA,
            start_time=data.get("start_time"),
            end_time=data.get("end_time"),
            event_id=data["event_id"],
            allow_unknown_meter=True,
        )


# The setters of UsageEvent's slots (their member descriptors), for __init__: a frozen
# dataclass refuses ``self.x = ...``, and calling a slot's own setter skips the lookup by
# name that ``object.__setattr__(self, "x", ...)`` makes for every field (nine of them:
# about 0.2 us of the 1.3 us it took to build an event).
_SLOTS = UsageEvent.__dict__
_SET_TENANT_ID = _SLOTS["tenant_id"].__set__
_SET_DEVICE_ID = _SLOTS["device_id"].__set__
_SET_METER_ID = _SLOTS["meter_id"].__set__
_SET_TOTAL_USAGE = _SLOTS["total_usage"].__set__
_SET_EVENT_TIME = _SLOTS["event_time"].__set__
_SET_METADATA = _SLOTS["metadata"].__set__
_SET_START_TIME = _SLOTS["start_time"].__set__
_SET_END_TIME = _SLOTS["end_time"].__set__
_SET_EVENT_ID = _SLOTS["event_id"].__set__
del _SLOTS


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
