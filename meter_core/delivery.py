"""One delivery attempt for a group of events: lookups, records, size-bounded batches,
and the reading of every outcome per event. No retries, no store: the sender and the
retry command decide what to do with the outcome."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from meter_core.customers import CustomerCache
from meter_core.errors import BackendUnavailable, DeliveryError
from meter_core.events import MAX_USAGE, UsageEvent
from meter_core.lookups import look_up_together, lookup_concurrency
from meter_core.transport import Transport
from meter_core.wire import RecordEncoder

__all__ = ["OUT_OF_TIME", "Outcome", "deliver_once"]

logger = logging.getLogger("meter.delivery")

T = TypeVar("T")
# Whole-request refusals caused by the records themselves (bad request, body too large,
# unprocessable record): the batch is split to isolate them. Others (401, 403, 404
# unknown topic...) would fail every part the same way.
_SPLIT_STATUSES = frozenset({400, 413, 422})
# ...within a bound (about this many requests per delivery attempt): a refusal that hits
# every record does not cost 2n requests.
_MAX_REQUESTS_WHEN_SPLITTING = 64
# Bytes of '{"records": [' + ']}' and of each ', ' separator in a produce body.
_BODY_OVERHEAD = 16
_SEPARATOR = 2
# The GIL is released before the first of every 64 items (see deliver_once), with
# sched_yield() where there is one: a thread waiting for the GIL runs at once, where
# time.sleep(0) also sleeps out the timer slack (about 50 µs) and costs the sender more CPU
# (benchmarks/bench_loop_lag.py).
_YIELD_MASK = 63


def _sleep0() -> None:
    time.sleep(0)


_release_gil: Callable[[], None] = getattr(os, "sched_yield", _sleep0)
OUT_OF_TIME = BackendUnavailable(
    "delivery attempt ran out of time (slow backend): the rest is sent at the next attempt"
)


@dataclass
class Outcome(Generic[T]):
    """What happened to each item: ``delivered``, or failed with an error that is
    ``retriable`` or ``final`` (grouped by error text). ``batches`` counts requests."""

    delivered: list[T] = field(default_factory=list)
    retriable: list[tuple[DeliveryError, list[T]]] = field(default_factory=list)
    final: list[tuple[DeliveryError, list[T]]] = field(default_factory=list)
    batches: int = 0
    deadline: float | None = None
    stop: Callable[[], bool] | None = None

    def out_of_time(self) -> bool:
        if self.stop is not None and self.stop():
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def add_failure(self, error: DeliveryError, items: list[T]) -> None:
        if not items:
            return
        bucket = self.retriable if error.retriable else self.final
        for known, group in bucket:
            if known is error or str(known) == str(error):
                group.extend(items)
                return
        bucket.append((error, list(items)))


def deliver_once(
    items: Sequence[T],
    event_of: Callable[[T], UsageEvent],
    *,
    transport: Transport,
    customers: CustomerCache,
    max_batch_bytes: int,
    max_records: int = 500,
    deadline: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> Outcome[T]:
    """Try each item's event once. Customer ids come through ``customers``; records go
    in produce requests of at most ``max_records`` records and ``max_batch_bytes`` bytes.
    A per-record error of a 200 fails that record alone. Never raises DeliveryError.
    Releases the GIL for a moment every 64 items, so that a large batch does not hold
    up the app's threads while it is encoded.

    ``deadline`` (a ``time.monotonic()`` value): no request starts after it; the items
    not sent by then fail as retriable. With a request's longest duration added, it bounds
    the attempt, so that it ends within the lease of events claimed from a store (after
    which another worker may claim and send them). ``stop``: asked before each request
    too; True ends the attempt as the deadline does (the sender's resend at close())."""
    outcome: Outcome[T] = Outcome(deadline=deadline, stop=stop)
    batch: list[T] = []
    records: list[Any] = []  # (in step with batch)
    size = _BODY_OVERHEAD
    produce_encoded = getattr(transport, "produce_encoded", None)
    encoded = callable(produce_encoded)
    encode = _ENCODER.encode
    # One answer per tenant per attempt: a failed lookup is not cached by the customer
    # cache, and asking again for each of a tenant's events would only multiply the wait.
    answers: dict[str, Any] = {}
    refused: dict[str, DeliveryError] = {}
    concurrency = lookup_concurrency(transport)
    look_ahead = concurrency > 1  # (once per attempt, at its first tenant not cached)
    for index, item in enumerate(items):
        if not index & _YIELD_MASK:
            # Let the app's threads take the GIL: one that asks for it while this thread
            # encodes would wait for the whole batch (an event loop's p99 wake-up delay:
            # see benchmarks/bench_loop_lag.py).
            _release_gil()
        event = event_of(item)
        customer = answers.get(event.tenant_id, _UNASKED)
        if (
            customer is _UNASKED
            and look_ahead
            and event.tenant_id not in refused
            and not customers.holds(event.tenant_id)
        ):
            # The first tenant the cache does not hold: look up every such tenant of the
            # rest of the attempt now, several at a time.
            look_ahead = False
            _look_up_rest(items[index:], event_of, customers, concurrency, outcome,
                          answers, refused)  # fmt: skip
            customer = answers.get(event.tenant_id, _UNASKED)
        if customer is _UNASKED:
            tenant = event.tenant_id
            error = refused.get(tenant)
            if error is None:
                if outcome.out_of_time():
                    outcome.add_failure(OUT_OF_TIME, batch)
                    outcome.add_failure(OUT_OF_TIME, list(items[index:]))
                    return outcome
                try:
                    customer = answers[tenant] = customers.get(tenant)
                except DeliveryError as exc:  # CustomerNotFound is final, a failed lookup retriable
                    error = refused[tenant] = exc
            if error is not None:
                outcome.add_failure(error, [item])
                continue
        record: Any
        if encoded:
            record = encode(event, customer)
            record_size = len(record) + _SEPARATOR  # ASCII: characters are bytes
        else:
            record = {"key": customer, "value": event.record_value(customer)}
            record_size = _encoded_size_bound(event, customer, record) + _SEPARATOR
        if batch and (size + record_size > max_batch_bytes or len(batch) >= max_records):
            _produce(batch, records, transport, outcome, encoded=encoded)
            batch, records, size = [], [], _BODY_OVERHEAD
        batch.append(item)
        records.append(record)
        size += record_size
    if batch:
        _produce(batch, records, transport, outcome, encoded=encoded)
    return outcome


_UNASKED: Any = object()
_ENCODER = RecordEncoder()


def _look_up_rest(
    items: Sequence[T],
    event_of: Callable[[T], UsageEvent],
    customers: CustomerCache,
    concurrency: int,
    outcome: Outcome[T],
    answers: dict[str, Any],
    refused: dict[str, DeliveryError],
) -> None:
    """Look up, ``concurrency`` at a time, the tenants of ``items`` that the cache does
    not hold, into ``answers`` and ``refused``. With fewer than two, nothing is done
    here: the attempt asks as it goes."""
    tenants: dict[str, None] = {}  # (in order of first appearance)
    for item in items:
        tenant = event_of(item).tenant_id
        if tenant not in tenants and tenant not in answers and tenant not in refused:
            tenants[tenant] = None
    new = [tenant for tenant in tenants if not customers.holds(tenant)]
    if len(new) < 2:
        return
    found, failed = look_up_together(
        new, customers, concurrency=concurrency, out_of_time=outcome.out_of_time
    )
    answers.update(found)
    refused.update(failed)


def _skeleton_size() -> int:
    """Bytes of the largest record with empty strings: the largest usage (19 digits),
    13-digit times, plus 20 characters of margin."""
    volume = UsageEvent("t", "d", "m", MAX_USAGE, 4_000_000_000_000, allow_unknown_meter=True)
    session = UsageEvent("t", "d", "m", start_time=4_000_000_000_000, allow_unknown_meter=True)
    sizes = []
    for event in (volume, session):
        value = event.record_value("")
        for name in ("meter_id", "tenant_id", "device_id"):
            value[name] = ""
        record = {"key": "", "value": value}
        sizes.append(len(json.dumps(record)) + 20)
    return max(sizes)


_SKELETON = _skeleton_size()


def _encoded_size_bound(event: UsageEvent, customer: Any, record: dict[str, Any]) -> int:
    """At least the size of ``json.dumps(record)``, cheaply. Ids are validated (no
    control characters), so an ASCII id escapes to at most twice its length; events with
    metadata or other ids are measured exactly."""
    if event.metadata or type(customer) is not str:
        return len(json.dumps(record))
    if not (customer + event.tenant_id + event.device_id + event.meter_id).isascii():
        return len(json.dumps(record))
    return _SKELETON + 2 * (2 * len(customer) + len(event.tenant_id) + len(event.device_id)
                            + len(event.meter_id))  # fmt: skip


def _produce(
    items: list[T],
    records: list[Any],
    transport: Transport,
    outcome: Outcome[T],
    *,
    encoded: bool,
) -> None:
    """Send ``records`` in one request and settle ``items`` (the same length, in step)."""
    if outcome.out_of_time():
        outcome.add_failure(OUT_OF_TIME, items)
        return
    outcome.batches += 1
    try:
        produce = transport.produce_encoded if encoded else transport.produce  # type: ignore[attr-defined]
        result = produce(records)
        if result.count != len(records):
            raise BackendUnavailable(
                f"the transport answered {result.count} results for {len(records)} records"
            )
    except DeliveryError as exc:
        if (
            not exc.retriable
            and len(items) > 1
            and exc.status in _SPLIT_STATUSES
            and outcome.batches < _MAX_REQUESTS_WHEN_SPLITTING
        ):
            # The proxy refused the request for what is in it (a record it cannot take,
            # or a body too large): halve it until the refusal falls on the records that
            # cause it, so the others in the batch still go through.
            middle = len(items) // 2
            _produce(items[:middle], records[:middle], transport, outcome, encoded=encoded)
            _produce(items[middle:], records[middle:], transport, outcome, encoded=encoded)
            return
        outcome.add_failure(exc, items)
        return
    except Exception as exc:  # a transport bug: keep the events, try again later
        logger.exception("transport raised unexpectedly")
        outcome.add_failure(BackendUnavailable(f"transport error: {exc!r}"), items)
        return
    if result.all_ok:
        outcome.delivered.extend(items)
        return
    for item, record_result in zip(items, result.records, strict=True):
        if record_result.ok:
            outcome.delivered.append(item)
        else:
            outcome.add_failure(record_result.as_error(), [item])
