"""The local backend's state: customer accounts, written records, faults, counters.

Thread-safe: every request handler thread reads and writes it under one lock, held
only for bookkeeping (never while a fault sleeps).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAULT_MODES", "BackendState", "Fault"]

FAULT_MODES = frozenset(
    {"down", "html502", "rate_limit", "slow", "record_errors", "unknown_tenant", "malformed",
     "partial_500", "reject"}
)  # fmt: skip
# Faults that also hit customer lookups; the others only hit produce requests.
_LOOKUP_FAULTS = frozenset({"down", "html502", "slow", "unknown_tenant"})


@dataclass
class Fault:
    """A misbehaviour of the backend. ``times``: how many more requests it hits (None:
    until cleared). ``params`` are the mode's settings (``delay``, ``retry_after``...)."""

    mode: str
    params: dict[str, Any] = field(default_factory=dict)
    times: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "times": self.times, **self.params}


class BackendState:
    """Everything the local backend remembers."""

    def __init__(
        self,
        *,
        customers: Mapping[str, str] | None = None,
        auto_customers: bool = True,
        unknown_tenants: Iterable[str] = (),
    ) -> None:
        self.lock = threading.Lock()
        self.customers: dict[str, str] = dict(customers or {})
        self.auto_customers = auto_customers
        self.unknown_tenants = set(unknown_tenants)
        self.records: list[dict[str, Any]] = []
        self.lookups: list[str] = []
        self.raw_bodies: list[bytes] = []
        self.produce_requests = 0
        self.lookups_in_flight = 0
        self.max_concurrent_lookups = 0  # the most lookups answered at once
        self.last_headers: dict[str, str] = {}
        self.fault: Fault | None = None
        self._next_offset = 0

    def set_fault(self, mode: str, times: int | None = None, **params: Any) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {sorted(FAULT_MODES)}")
        with self.lock:
            self.fault = Fault(mode, dict(params), times)

    def clear_fault(self) -> None:
        with self.lock:
            self.fault = None

    def take_fault(self, *, lookup: bool) -> Fault | None:
        """The fault that applies to this request (and one use of it), or None."""
        with self.lock:
            fault = self.fault
            if fault is None or (lookup and fault.mode not in _LOOKUP_FAULTS):
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.fault = None
            return fault

    def lookup_started(self) -> None:
        with self.lock:
            self.lookups_in_flight += 1
            self.max_concurrent_lookups = max(self.max_concurrent_lookups, self.lookups_in_flight)

    def lookup_ended(self) -> None:
        with self.lock:
            self.lookups_in_flight -= 1

    def customer_for(self, tenant_id: str) -> str | None:
        with self.lock:
            self.lookups.append(tenant_id)
            if tenant_id in self.unknown_tenants:
                return None
            if tenant_id in self.customers:
                return self.customers[tenant_id]
            return f"cust-{tenant_id}" if self.auto_customers else None

    def write(self, topic: str, records: list[dict[str, Any]]) -> list[int]:
        """Append records; returns their offsets."""
        now = time.time()
        offsets = []
        with self.lock:
            for record in records:
                offset = self._next_offset
                self._next_offset += 1
                self.records.append(
                    {"topic": topic, "partition": 0, "offset": offset,
                     "key": record.get("key"), "value": record["value"], "received_at": now}
                )  # fmt: skip
                offsets.append(offset)
        return offsets

    def reset(self) -> None:
        with self.lock:
            self.records.clear()
            self.lookups.clear()
            self.raw_bodies.clear()
            self.produce_requests = 0
            self.max_concurrent_lookups = self.lookups_in_flight
            self.fault = None

    def stats(self) -> dict[str, Any]:
        with self.lock:
            ids = [r["value"].get("event_id") for r in self.records]
            ids = [i for i in ids if i]
            unique = len(set(ids))
            return {
                "records": len(self.records),
                "unique_event_ids": unique,
                "duplicates": len(ids) - unique,
                "lookups": len(self.lookups),
                "max_concurrent_lookups": self.max_concurrent_lookups,
                "produce_requests": self.produce_requests,
                "fault": self.fault.as_dict() if self.fault else None,
            }
