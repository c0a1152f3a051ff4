"""Background delivery above the transport: batching, bounds, hooks, flush and close.

These tests use in-memory transports (the transport is the one place that does I/O);
the same behaviours against the real local backend are in test_faults.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from meter_core import (
    BackendUnavailable,
    DeliveryError,
    InvalidEvent,
    MemoryFailureStore,
    MemoryTransport,
    MeterClient,
    ProduceResult,
    SQLiteSpool,
    UsageEvent,
    capture_events,
)
from meter_core.devserver import DevServer

RECORD = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 1}


def client_with(transport: Any, **options: Any) -> MeterClient:
    options.setdefault("flush_interval", 0.02)
    options.setdefault("device_id", "dev-1")
    return MeterClient(transport=transport, **options)


class DownTransport(MemoryTransport):
    """Lookups work; every produce fails as unavailable until ``up`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.up = threading.Event()
        self.attempts = 0

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        self.attempts += 1
        if not self.up.is_set():
            raise BackendUnavailable("backend down")
        return super().produce(records)


class GatedTransport(MemoryTransport):
    """Blocks every produce until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        self.gate.wait(10)
        return super().produce(records)


def test_record_validates_at_once_and_returns_the_event_id() -> None:
    transport = MemoryTransport()
    client = client_with(transport)
    try:
        with pytest.raises(InvalidEvent, match="total_usage"):
            client.record(**{**RECORD, "total_usage": -1})
        event_id = client.record(**RECORD)
        assert client.flush(5)
        assert [v["event_id"] for v in transport.values()] == [event_id]
    finally:
        client.close()


def test_record_needs_a_device_when_the_client_has_none() -> None:
    client = MeterClient(transport="memory")
    with pytest.raises(InvalidEvent, match="device_id"):
        client.record(**RECORD)
    client.close()


def test_records_are_batched_up_to_batch_size() -> None:
    transport = MemoryTransport()
    client = client_with(transport, batch_size=100, flush_interval=5)
    sizes: list[int] = []
    original = transport.produce

    def counting(records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        sizes.append(len(records))
        return original(records)

    transport.produce = counting  # type: ignore[method-assign]
    try:
        for _ in range(250):
            client.record(**RECORD)
        assert client.flush(5)
        assert sum(sizes) == 250
        assert max(sizes) == 100
        assert client.stats()["batches"] == len(sizes)
    finally:
        client.close()


def test_batches_respect_max_batch_bytes() -> None:
    transport = MemoryTransport()
    client = client_with(transport, max_batch_bytes=4096)
    bodies: list[int] = []
    original = transport.produce

    def measuring(records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        bodies.append(len(json.dumps({"records": records})))
        return original(records)

    transport.produce = measuring  # type: ignore[method-assign]
    try:
        for _ in range(60):
            client.record(**RECORD, metadata={"note": "x" * 300})
        assert client.flush(5)
        assert len(transport.records) == 60
        assert len(bodies) > 1
        assert max(bodies) <= 4096
    finally:
        client.close()


def test_record_key_is_the_customer_id() -> None:
    transport = MemoryTransport({"acme": "cust-42"})
    client = client_with(transport)
    client.record(**RECORD)
    assert client.flush(5)
    assert transport.records[0]["key"] == "cust-42"
    assert transport.records[0]["value"]["customer_id"] == "cust-42"
    client.close()


def test_one_lookup_for_many_events_of_one_tenant() -> None:
    transport = MemoryTransport()
    client = client_with(transport)
    for _ in range(500):
        client.record(**RECORD)
    assert client.flush(5)
    assert transport.lookups == ["acme"]
    client.close()


def test_full_queue_without_store_drops_the_newest_counts_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = GatedTransport()
    client = client_with(transport, max_queue=10, batch_size=1000, flush_interval=10)
    try:
        ids = [client.record(**RECORD) for _ in range(25)]
        stats = client.stats()
        assert stats["dropped"] == 15
        assert stats["recorded"] == 25  # every call accepted; 15 of them dropped at once
        assert len([r for r in caplog.records if "queue is full" in r.message]) == 1
        transport.gate.set()
        assert client.flush(5)
        assert [v["event_id"] for v in transport.values()] == ids[:10]
    finally:
        transport.gate.set()
        client.close()


def test_full_queue_spills_to_the_store_and_the_sender_drains_it(tmp_path: Path) -> None:
    transport = GatedTransport()
    spool = SQLiteSpool(tmp_path / "spool.db")
    client = client_with(transport, max_queue=5, failure_store=spool, flush_interval=0.05)
    try:
        ids = {client.record(**RECORD) for _ in range(20)}
        stats = client.stats()
        assert stats["dropped"] == 0
        assert stats["recorded"] == 20
        assert stats["stored"] >= 10  # what did not fit in the queue (or the batch in flight)
        assert spool.pending_count() == stats["stored"]
        transport.gate.set()
        deadline = time.monotonic() + 10
        while len(transport.records) < 20 and time.monotonic() < deadline:
            client.flush(1)
        assert {v["event_id"] for v in transport.values()} == ids
        assert spool.pending_count() == 0
    finally:
        transport.gate.set()
        client.close()


@pytest.mark.usefixtures("quick_recovery")
def test_events_waiting_for_a_retry_count_against_max_queue(tmp_path: Path) -> None:
    transport = DownTransport()
    spool = SQLiteSpool(tmp_path / "spool.db")
    client = client_with(
        transport, max_queue=10, batch_size=10, failure_store=spool,
        backoff_base=30, backoff_cap=60,
    )  # fmt: skip
    try:
        first = [client.record(**RECORD) for _ in range(10)]
        deadline = time.monotonic() + 5
        while client.stats()["retried"] < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.stats()["retried"] == 10  # all ten now wait in memory for a retry
        later = [client.record(**RECORD) for _ in range(15)]
        stats = client.stats()
        # memory holds no more than max_queue: every new event went to the store
        assert stats["stored"] == 15 and stats["dropped"] == 0
        deadline = time.monotonic() + 5  # (the store's events failed too: an outage)
        while client.stats()["retried"] <= 10 and time.monotonic() < deadline:
            client.flush(0.05)  # (wakes the sender: it takes the store's events)
        assert client.stats()["retried"] > 10
        transport.up.set()
        later.append(client.record(**RECORD))  # (its delivery says the backend is back)
        # the backend is back: the retries go at once, and the store's events follow
        deadline = time.monotonic() + 10
        while len(transport.records) < 26 and time.monotonic() < deadline:
            client.flush(0.05)
        assert {v["event_id"] for v in transport.values()} == set(first) | set(later)
    finally:
        transport.up.set()
        client.close(0)
    assert spool.pending_count() == 0


def test_before_send_can_change_or_drop_events() -> None:
    def hook(event: UsageEvent) -> UsageEvent | None:
        if event.total_usage == 0:
            return None
        return UsageEvent.from_dict({**event.to_dict(), "metadata": {"region": "eu"}})

    transport = MemoryTransport()
    client = client_with(transport, before_send=hook)
    client.record(**RECORD)
    client.record(**{**RECORD, "total_usage": 0})
    assert client.flush(5)
    assert [v["metadata"] for v in transport.values()] == [{"region": "eu"}]
    assert client.stats()["dropped"] == 1
    assert client.stats()["recorded"] == 2  # the dropped one was accepted by record()
    client.close()


class _OneBatchAtATime(MemoryTransport):
    """Each produce waits for a permit: the test lets batches through one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)

    def produce(self, records: Sequence[Mapping[str, Any]]) -> Any:
        self.permits.acquire(timeout=10)
        return super().produce(records)


def test_a_full_queue_that_drains_a_batch_at_a_time_logs_once_not_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A slow backend: the queue drains one batch, fills, drops, drains another... each
    # drain began a new burst, and each burst logged its ERROR line.
    transport = _OneBatchAtATime()
    client = client_with(transport, max_queue=5, batch_size=5, flush_interval=0.01)
    try:
        with caplog.at_level(logging.ERROR, logger="meter"):
            for _ in range(3):
                for _ in range(6):  # five fit, one is dropped
                    client.record(**RECORD)
                sent = len(transport.records)
                transport.permits.release()  # the batch in flight goes
                deadline = time.monotonic() + 5
                while client.stats()["queue_depth"] and time.monotonic() < deadline:
                    time.sleep(0.01)  # the next batch is taken off the queue
                assert len(transport.records) >= sent
        assert client.stats()["dropped"] >= 3
        full = [r for r in caplog.records if "queue is full" in r.getMessage()]
        assert len(full) == 1
    finally:
        for _ in range(5):
            transport.permits.release()
        client.close(2)


def test_capture_sees_events_as_before_send_leaves_them() -> None:
    # A test must see what the app would bill: the hook's changes, not its drops.
    def hook(event: UsageEvent) -> UsageEvent | None:
        if event.tenant_id.startswith("internal-"):
            return None
        return UsageEvent.from_dict({**event.to_dict(), "total_usage": event.total_usage * 10})

    transport = MemoryTransport()
    client = client_with(transport, before_send=hook)
    with capture_events() as captured:
        client.record(**{**RECORD, "tenant_id": "internal-qa"})
        client.record(**{**RECORD, "total_usage": 2})
        client.enqueue_many([client.event(**{**RECORD, "tenant_id": "internal-x"})])
    assert client.flush(5)
    sent = [(v["tenant_id"], v["total_usage"]) for v in transport.values()]
    assert [(e.tenant_id, e.total_usage) for e in captured] == sent == [("acme", 20)]
    client.close()


def test_close_without_a_store_says_how_many_failed_events_die_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Their failure was logged once, throttled: close() is the last word on what is lost.
    client = client_with(DownTransport(), max_retries=0)
    for _ in range(3):
        client.record(**RECORD)
    assert client.flush(5)
    with caplog.at_level(logging.ERROR, logger="meter"):
        client.close(1)
    assert client.stats()["failed_in_memory"] == 3
    assert "3 usage events at close (0 undelivered now, 3 failed earlier)" in caplog.text
    assert "lost when the process exits" in caplog.text


def test_on_error_gets_events_that_failed_for_good() -> None:
    failures: list[tuple[list[str], BaseException]] = []
    transport = DownTransport()
    client = client_with(
        transport,
        max_retries=1,
        backoff_base=0.01,
        backoff_cap=0.01,
        on_error=lambda events, exc: failures.append(([e.event_id for e in events], exc)),
    )
    event_id = client.record(**RECORD)
    assert client.flush(5)
    assert transport.attempts == 2
    assert failures[0][0] == [event_id]
    assert isinstance(failures[0][1], DeliveryError)
    stats = client.stats()
    assert stats["failed"] == 1 and stats["retried"] == 1
    # no store: kept in memory, not "stored" (nor dropped)
    assert stats["stored"] == stats["dropped"] == 0 and stats["failed_in_memory"] == 1
    assert [s.event.event_id for s in client.failed_events()] == [event_id]
    assert "backend down" in (stats["last_error"] or "")
    client.close()


def test_close_stores_what_is_undelivered_and_is_idempotent(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db")
    transport = DownTransport()
    client = client_with(transport, failure_store=spool, backoff_base=5, backoff_cap=5)
    ids = {client.record(**RECORD) for _ in range(30)}
    started = time.monotonic()
    client.close(timeout=0.5)
    client.close(timeout=0.5)
    assert time.monotonic() - started < 3
    stored = spool.claim(100)
    assert {s.event.event_id for s in stored} == ids
    late = client.record(**RECORD)
    spool.release([s.event.event_id for s in stored])
    assert late in {s.event.event_id for s in spool.claim(100)}
    stats = client.stats()
    assert stats["recorded"] == 31 and stats["stored"] == 31  # the late one counted too


def test_close_without_a_store_says_the_undelivered_events_are_only_in_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = DownTransport()
    client = client_with(transport, backoff_base=30, backoff_cap=60)
    ids = {client.record(**RECORD) for _ in range(5)}
    deadline = time.monotonic() + 5
    while client.stats()["retried"] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close(timeout=0.1)
    assert {s.event.event_id for s in client.failed_events()} == ids
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(m.startswith("5 usage events at close (5 undelivered now") and "lost when "
               "the process exits" in m for m in errors), errors  # fmt: skip


def test_close_from_many_threads_at_once() -> None:
    client = client_with(MemoryTransport())
    for _ in range(10):
        client.record(**RECORD)
    threads = [threading.Thread(target=client.close) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert client.stats()["sent"] == 10


def test_flush_times_out_while_the_backend_is_down() -> None:
    transport = DownTransport()
    client = client_with(transport, backoff_base=10, backoff_cap=10)
    client.record(**RECORD)
    assert client.flush(0.3) is False
    transport.up.set()
    client.close(0.1)


def test_disabled_client_validates_captures_and_sends_nothing() -> None:
    transport = MemoryTransport()
    client = client_with(transport, enabled=False)
    with capture_events() as captured:
        event_id = client.record(**RECORD)
        with pytest.raises(InvalidEvent):
            client.record(**{**RECORD, "meter_id": "nope"})
    assert [e.event_id for e in captured] == [event_id]
    assert client.flush(1)
    assert transport.records == []
    client.close()


def test_a_disabled_client_needs_no_backend_url() -> None:
    client = MeterClient(enabled=False, device_id="dev-1")
    with capture_events() as captured:
        event_id = client.record(**RECORD)
    assert [e.event_id for e in captured] == [event_id]
    assert client.send(**RECORD) == {"offsets": [], "disabled": True}
    client.close()
    env_client = MeterClient.from_env({"METER_ENABLED": "false", "METER_DEVICE_ID": "d"})
    assert env_client.enabled is False
    env_client.close()


def test_capture_collects_events_of_every_client() -> None:
    a, b = client_with(MemoryTransport()), client_with(MemoryTransport())
    with capture_events() as captured:
        a.record(**RECORD)
        b.record_session(
            tenant_id="t2", meter_id="chat.on.time_hours", start_time=1_700_000_000_000
        )
    a.record(**RECORD)
    assert len(captured) == 2
    assert captured.total("page.processed.basic") == 1
    assert [e.tenant_id for e in captured.for_meter("chat.on.time_hours")] == ["t2"]
    a.close()
    b.close()


def test_async_face_never_blocks_the_loop() -> None:
    transport = MemoryTransport()
    client = client_with(transport)

    async def main() -> list[str]:
        ids = [await client.arecord(**RECORD) for _ in range(5)]
        ids.append(
            await client.arecord_session(
                tenant_id="acme", meter_id="chat.on.time_hours", end_time=1_700_000_000_000
            )
        )
        assert await client.aflush(5)
        late = await client.arecord(**RECORD)
        await client.aclose()  # delivers what is queued, then closes
        return [*ids, late]

    ids = asyncio.run(main())
    assert [v["event_id"] for v in transport.values()] == ids
    assert client.record(**RECORD) in {s.event.event_id for s in client.failed_events()}


def test_stats_report_queue_depth() -> None:
    transport = GatedTransport()
    client = client_with(transport, batch_size=1000, flush_interval=10)
    for _ in range(7):
        client.record(**RECORD)
    assert client.stats()["queue_depth"] == 7
    assert client.stats()["recorded"] == 7  # counted while still queued
    transport.gate.set()
    assert client.flush(5)
    assert client.stats()["queue_depth"] == 0
    assert client.stats()["recorded"] == 7  # and not again once taken off the queue
    assert client.stats()["sent"] == 7
    client.close()


class EncodedTransport(MemoryTransport):
    """Takes records as JSON text, as HTTPTransport does; keeps each request's body."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def produce_encoded(self, records: Sequence[str]) -> ProduceResult:
        from meter_core.wire import join_encoded_records

        self.bodies.append(join_encoded_records(records))
        return self.produce([json.loads(r) for r in records])


def test_encoded_records_respect_max_batch_bytes_and_read_back_the_same() -> None:
    transport = EncodedTransport()
    client = client_with(transport, max_batch_bytes=4096)
    try:
        for i in range(60):
            client.record(**RECORD, metadata={"note": "é" * 150, "i": str(i)})
        assert client.flush(5)
    finally:
        client.close()
    assert len(transport.bodies) > 1
    assert max(len(b) for b in transport.bodies) <= 4096
    notes = [v["metadata"]["i"] for v in transport.values()]
    assert sorted(notes, key=int) == [str(i) for i in range(60)]


class ShortAnswerTransport(MemoryTransport):
    """Answers the first produce with one result fewer than it was given records."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        self.calls += 1
        result = super().produce(records)
        if self.calls == 1:
            return ProduceResult(body=result.body, records=result.records[:-1])
        return result


def test_a_transport_answering_too_few_results_gets_the_batch_retried_not_lost() -> None:
    transport = ShortAnswerTransport()
    client = client_with(transport, backoff_base=0.01, backoff_cap=0.02)
    try:
        ids = [client.record(**RECORD) for _ in range(5)]
        assert client.flush(5)
        stats = client.stats()
    finally:
        client.close()
    # the first request's events (however many the sender had taken) were retried
    assert stats["retried"] >= 1
    assert stats["sent"] == 5 and stats["failed"] == 0
    assert {v["event_id"] for v in transport.values()} == set(ids)


class FailOneRecordTransport(MemoryTransport):
    """Answers through the proxy's JSON, as HTTPTransport does: its first answer fails the
    record at ``index`` with ``error_code``; every other record gets an offset."""

    def __init__(self, index: int, error_code: int = 50003) -> None:
        super().__init__()
        self.index = index
        self.error_code = error_code
        self.requests: list[list[str]] = []

    def produce_encoded(self, records: Sequence[str]) -> ProduceResult:
        from meter_core.wire import parse_produce_response

        values = [json.loads(r) for r in records]
        offsets: list[dict[str, Any]] = []
        for i, value in enumerate(values):
            if not self.requests and i == self.index:
                offsets.append({"partition": None, "offset": None,
                                "error_code": self.error_code, "error": "no leader"})  # fmt: skip
            else:
                offsets.append({"partition": 0, "offset": len(self.records), "error_code": None,
                                "error": None})  # fmt: skip
                self.records.append(value)
        self.requests.append([v["value"]["event_id"] for v in values])
        body = json.dumps({"key_schema_id": None, "value_schema_id": None, "offsets": offsets})
        return parse_produce_response(200, {}, body.encode(), len(records))


@pytest.mark.parametrize("index", [0, 250, 499])
def test_one_failed_record_of_a_full_batch_is_retried_alone(index: int) -> None:
    transport = FailOneRecordTransport(index)
    client = client_with(transport, flush_interval=5, backoff_base=0.01, backoff_cap=0.02)
    try:
        client.lookup_customer("acme")
        ids = [client.record(**RECORD) for _ in range(500)]
        assert client.flush(5)
        stats = client.stats()
    finally:
        client.close()
    assert [len(r) for r in transport.requests] == [500, 1]
    assert transport.requests[1] == [ids[index]]
    assert sorted(v["event_id"] for v in transport.values()) == sorted(ids)
    assert stats["sent"] == 500 and stats["retried"] == 1 and stats["failed"] == 0


def test_a_record_failing_for_good_among_a_full_batch_is_the_only_one_stored() -> None:
    transport = FailOneRecordTransport(3, error_code=50002)
    store = MemoryFailureStore()
    client = client_with(transport, flush_interval=5, failure_store=store)
    try:
        client.lookup_customer("acme")
        ids = [client.record(**RECORD) for _ in range(500)]
        assert client.flush(5)
        stats = client.stats()
    finally:
        client.close()
    assert [s.event.event_id for s in store.events()] == [ids[3]]
    assert stats["sent"] == 499 and stats["failed"] == 1 and stats["retried"] == 0


@pytest.mark.parametrize("transport", [MemoryTransport(), EncodedTransport()])
def test_events_of_a_tenant_without_account_fail_alone_after_one_lookup(
    transport: MemoryTransport,
) -> None:
    from meter_core import CustomerNotFound
    from meter_core.customers import CustomerCache
    from meter_core.delivery import deliver_once

    lookups: list[str] = []

    def lookup(tenant: str) -> str:
        lookups.append(tenant)
        if tenant != "acme":
            raise CustomerNotFound(f"no account for {tenant}")
        return "c-1"

    events = [
        UsageEvent(tenant, "dev", "page.processed.basic", n)
        for n, tenant in enumerate(["acme", "ghost", "acme", "ghost", "acme"])
    ]
    outcome = deliver_once(
        events, lambda e: e, transport=transport, customers=CustomerCache(lookup),
        max_batch_bytes=1 << 20,
    )  # fmt: skip
    assert outcome.delivered == events[0::2]
    [(error, group)] = outcome.final
    assert isinstance(error, CustomerNotFound) and group == events[1::2]
    assert outcome.retriable == [] and outcome.batches == 1
    assert lookups == ["acme", "ghost"]
    assert [v["total_usage"] for v in transport.values()] == [0, 2, 4]


def test_sender_thread_starts_lazily() -> None:
    before = {t.name for t in threading.enumerate()}
    client = client_with(MemoryTransport())
    assert client._sender is None
    client.record(**RECORD)
    assert "meter-sender" in {t.name for t in threading.enumerate()} - before or client.flush(1)
    client.close()


def test_log_transport_logs_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meter.transport")
    client = client_with("log")
    client.record(**RECORD)
    assert client.flush(5)
    assert "page.processed.basic" in caplog.text
    client.close()


class SlowTransport(MemoryTransport):
    """Each produce takes ``delay`` seconds (a slow backend)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        time.sleep(self.delay)
        return super().produce(records)


def test_close_during_a_slow_send_loses_no_batch() -> None:
    # close() gives up waiting while a batch is on the wire: the sender thread must not
    # then take the next batch and drop it when it sees that the client is stopping.
    transport = SlowTransport(0.3)
    client = client_with(transport, batch_size=10)
    ids = {client.record(**RECORD) for _ in range(30)}
    time.sleep(0.05)  # the first batch is on its way
    client.close(timeout=0.1)
    time.sleep(0.5)  # let the batch in flight finish
    delivered = {v["event_id"] for v in transport.values()}
    kept = {s.event.event_id for s in client.failed_events()}
    assert delivered | kept == ids
    stats = client.stats()
    assert stats["dropped"] == 0 and stats["queue_depth"] == 0


def test_an_event_recorded_while_close_runs_is_kept() -> None:
    # The race: record() finds the client open, close() then collects the queue, and only
    # then is the event appended. It must still be kept, not stranded in the queue.
    client = client_with(MemoryTransport())
    client.record(**RECORD)  # the sender exists
    sender = client._get_sender()

    class ClosingQueue(collections.deque):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:
            sender.close(0)  # close() runs between enqueue's check and its append
            super().append(item)

    sender._queue = ClosingQueue(sender._queue)
    late = client.record(**RECORD)
    assert late in {s.event.event_id for s in client.failed_events()}
    assert client.stats()["queue_depth"] == 0


def test_close_keeps_the_lease_of_store_events_still_being_sent(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db")
    transport = SlowTransport(1.5)  # longer than close() waits for the thread
    client = client_with(transport, durable=True, failure_store=spool)
    event_id = client.record(**RECORD)
    time.sleep(0.2)  # the sender has claimed it and is sending it
    client.close(timeout=0.1)
    # still leased: a retry worker must not send it while this send may succeed
    assert spool.claim(100, lease_seconds=0) == []
    time.sleep(1.2)
    assert [v["event_id"] for v in transport.values()] == [event_id]


def test_a_store_failing_with_any_error_keeps_the_events_in_memory() -> None:
    class BrokenStore(MemoryFailureStore):
        def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
            raise OSError("read-only file system")

    transport = DownTransport()
    client = client_with(transport, max_retries=0, failure_store=BrokenStore(10))
    ids = {client.record(**RECORD) for _ in range(5)}
    assert client.flush(2)
    assert {s.event.event_id for s in client.failed_events()} == ids
    assert client.stats()["failed"] == 5
    client.close(0)


def test_durable_close_does_not_wait_for_events_other_processes_keep_storing(
    tmp_path: Path,
) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db")
    client = client_with(SlowTransport(0.05), durable=True, failure_store=spool)
    client.record(**RECORD)
    stop = threading.Event()

    def another_worker() -> None:  # a process sharing the store, still serving requests
        other = SQLiteSpool(tmp_path / "spool.db")
        while not stop.is_set():
            other.store([UsageEvent("acme", "w2", "page.processed.basic", 1) for _ in range(20)])
            time.sleep(0.005)

    writer = threading.Thread(target=another_worker)
    writer.start()
    try:
        time.sleep(0.1)
        started = time.monotonic()
        client.close(timeout=3)
        took = time.monotonic() - started
    finally:
        stop.set()
        writer.join()
    assert took < 1.5  # not the whole timeout: the store's rows are safe where they are


def test_close_called_by_an_on_error_hook_returns_at_once() -> None:
    closed_in: list[float] = []
    client: MeterClient

    def give_up(events: Sequence[UsageEvent], exc: BaseException) -> None:
        started = time.monotonic()
        client.close(timeout=3)  # on the sender thread: it can never see itself settle
        closed_in.append(time.monotonic() - started)

    client = client_with(DownTransport(), max_retries=0, on_error=give_up)
    ids = {client.record(**RECORD) for _ in range(3)}
    deadline = time.monotonic() + 5
    while not closed_in and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closed_in and closed_in[0] < 1
    time.sleep(0.1)
    assert {s.event.event_id for s in client.failed_events()} == ids
    stats = client.stats()  # once each, in memory (no store)
    assert stats["failed_in_memory"] == 3 and stats["stored"] == stats["dropped"] == 0


def test_a_send_that_fails_after_close_took_it_over_is_not_stored_again() -> None:
    class SlowThenDown(MemoryTransport):
        def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
            time.sleep(1.0)
            raise BackendUnavailable("down")

    errors: list[int] = []
    client = client_with(SlowThenDown(), on_error=lambda events, exc: errors.append(len(events)))
    event_id = client.record(**RECORD)
    time.sleep(0.1)  # on the wire
    client.close(timeout=0.1)
    assert [s.event.event_id for s in client.failed_events()] == [event_id]
    time.sleep(1.2)  # the send fails after close() stored the event
    stats = client.stats()
    assert stats["failed_in_memory"] == 1 and stats["failed"] == 0 and errors == []
    assert len(client.failed_events()) == 1


def test_close_does_not_wait_for_a_claim_on_a_busy_store(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, busy_timeout=5)
    client = client_with(MemoryTransport(), durable=True, failure_store=spool)
    client.record(**RECORD)
    assert client.flush(5)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process writes: the sender's claims wait
    try:
        client.wake()
        time.sleep(0.2)
        started = time.monotonic()
        client.close(timeout=0.5)
        took = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert took < 1.5  # its timeout and the thread's join, not the store's busy wait


def test_an_event_recorded_after_close_without_a_store_is_logged_as_at_risk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (another library's atexit hook, run after the client's own, records one more event)
    client = MeterClient(transport="memory", device_id="d")
    client.close(1)
    with caplog.at_level(logging.ERROR, logger="meter"):
        client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    errors = [r for r in caplog.records if "after the meter client was closed" in r.getMessage()]
    assert len(errors) == 1  # throttled
    assert client.stats()["failed_in_memory"] == 2


def _waiting_for_a_retry(
    backend: DevServer, events: int, *, backoff: float, times: int | None = None, **options: Any
) -> tuple[MeterClient, set[str]]:
    """A client whose ``events`` recorded events failed once (the backend down, for
    ``times`` requests or until further notice) and wait ``backoff`` s for their retry."""
    client = MeterClient(backend.url, internal_url=backend.url, device_id="d",
                         backoff_base=backoff, backoff_cap=backoff, **options)  # fmt: skip
    client.send(**RECORD)  # (the tenant's customer is looked up: the fault hits the produce)
    backend.reset()
    backend.set_fault("down", times=times)
    ids = {client.record(**RECORD) for _ in range(events)}
    deadline = time.monotonic() + 10
    while client.stats()["retried"] < events and time.monotonic() < deadline:
        time.sleep(0.01)
    return client, ids


def test_close_with_a_store_does_not_wait_out_the_retries_of_an_outage(
    backend: DevServer, tmp_path: Path
) -> None:
    # (a worker restarting during an outage: the server starts its replacement only once
    # it has exited, so every second close() waits is a second with one worker less)
    spool = SQLiteSpool(tmp_path / "spool.db")
    client, ids = _waiting_for_a_retry(backend, 20, backoff=20, failure_store=spool)
    started = time.monotonic()
    client.close(timeout=30)
    assert time.monotonic() - started < 10  # not the 20 s backoff, nor the 30 s timeout
    assert {s.event.event_id for s in spool.claim(100)} == ids  # all kept for the retry


def test_close_without_a_store_still_waits_for_a_retry_that_can_deliver(
    backend: DevServer,
) -> None:
    # (there, the memory list dies with the process: the wait is the events' only chance)
    client, ids = _waiting_for_a_retry(backend, 5, backoff=0.5, times=1)
    client.close(timeout=10)
    assert set(backend.event_ids()) == ids


@pytest.mark.parametrize("store", ["unwritable spool", "memory store"])
def test_close_still_waits_for_a_retry_when_the_store_could_not_keep_the_events(
    backend: DevServer, tmp_path: Path, store: str
) -> None:
    # (a store that fails, or one in memory, dies with the process: only a delivery
    # keeps these events)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    failure_store = (
        SQLiteSpool(blocker / "spool.db") if store == "unwritable spool" else MemoryFailureStore()
    )
    client, ids = _waiting_for_a_retry(
        backend, 5, backoff=0.5, times=1, failure_store=failure_store
    )
    client.close(timeout=10)
    assert set(backend.event_ids()) == ids
    assert client.stats()["failed_in_memory"] == 0


def test_close_asks_a_store_that_just_refused_the_retries_only_once(
    backend: DevServer, tmp_path: Path
) -> None:
    # (a file locked by another process: each write waits its whole busy timeout)
    import sqlite3

    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, busy_timeout=3)
    client, ids = _waiting_for_a_retry(backend, 5, backoff=20, failure_store=spool)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        client.close(timeout=1)
        assert time.monotonic() - started < 5.5  # one busy timeout (3 s), not two
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert {s.event.event_id for s in client.failed_events()} == ids  # kept, in memory


def test_close_waits_for_a_locked_spool_no_longer_than_its_timeout(
    backend: DevServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The spool keeps its default busy timeout (30 s): close(timeout=1) waited all of it
    # (an exit, a worker's restart, held up 30 s), and then kept the events in memory
    # anyway. It now waits for the lock until its own timeout.
    import sqlite3

    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path)
    client, ids = _waiting_for_a_retry(backend, 5, backoff=20, failure_store=spool)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="meter"):
            client.close(timeout=1)
        assert time.monotonic() - started < 4  # 1 s, and half a second per write after
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert {s.event.event_id for s in client.failed_events()} == ids  # kept, in memory
    assert "5 usage events are held only in memory at close" in caplog.text
    spool.store([UsageEvent("acme", "d", "page.processed.basic", 1)])  # (30 s again, and
    assert spool.pending_count() == 1  # the file works once the lock is gone)


class _Interrupt(BaseException):
    """Stands for gevent's Timeout: a BaseException raised out of a store write."""


def test_a_base_exception_from_the_store_at_close_loses_no_event(
    backend: DevServer, tmp_path: Path
) -> None:
    class InterruptedOnce(SQLiteSpool):
        interrupted = False

        def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
            if not self.interrupted:
                type(self).interrupted = True
                raise _Interrupt
            super().store(events, **kwargs)

    spool = InterruptedOnce(tmp_path / "spool.db")
    client, ids = _waiting_for_a_retry(backend, 5, backoff=20, failure_store=spool)
    with pytest.raises(_Interrupt):
        client.close(timeout=5)
    client.close(timeout=5)  # the interrupted close, done again
    assert {s.event.event_id for s in spool.claim(100)} == ids


def test_a_send_failing_after_close_began_is_stored_as_undelivered_not_failed(
    backend: DevServer, tmp_path: Path
) -> None:
    # The send times out (retriable, retries left) after close() has marked the client
    # closed but before it stops waiting for the thread: nothing retries it here any
    # more, and it did not fail for good either.
    errors: list[int] = []
    spool = SQLiteSpool(tmp_path / "s.db")
    client = MeterClient(backend.url, internal_url=backend.url, device_id="d", timeout=0.3,
                         max_retries=5, failure_store=spool, flush_interval=0.02,
                         on_error=lambda events, exc: errors.append(len(events)))  # fmt: skip
    client.lookup_customer("acme")  # (the lookup is not the slow part)
    backend.set_fault("slow", delay=1.0)
    event_id = client.record(**RECORD)
    time.sleep(0.1)  # on the wire
    client.close(timeout=0.05)
    stats = client.stats()
    assert stats["failed"] == 0 and stats["stored"] == 1 and errors == []
    (row,) = spool.claim(10)
    assert row.event.event_id == event_id
    # (with what the last try met: "undelivered at close" alone hid it from operators)
    assert row.last_error.startswith("undelivered at close (last delivery error: produce to ")
    assert row.last_error.endswith(" timed out after 0.3s)")


def test_a_flush_waiting_for_a_retry_leaves_the_cpu_alone(backend: DevServer) -> None:
    # The event waits out a 429's Retry-After: flush(1.5) waits with it, idle (it once
    # woke the sender at each of its cycles' ends, a core busy for the whole wait, the
    # GIL taken from the app: at every shutdown during an outage).
    client = MeterClient(backend.url, internal_url=backend.url, device_id="d",
                         flush_interval=0.02)  # fmt: skip
    client.send(**RECORD)
    backend.set_fault("rate_limit", retry_after=5)
    client.record(**RECORD)
    deadline = time.monotonic() + 5
    while client.stats()["retried"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu = time.process_time()
    assert not client.flush(1.5)
    assert time.process_time() - cpu < 0.5
    backend.clear_fault()
    assert client.flush(10)  # (the retry, 5 s after the refusal, goes through)
    client.close(0)
