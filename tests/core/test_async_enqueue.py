"""The async face of enqueueing: a store write never runs on the event loop, and the
events of one unit of work are stored in one call, which a cancellation cannot split."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

import meter_core.sender as sender_module
from meter_core import MemoryFailureStore, MeterClient, StoreError, UsageEvent
from tests.core.test_sender import DownTransport, GatedTransport, client_with


class WatchedStore(MemoryFailureStore):
    """A memory store noting, for each ``store()`` call, its thread and its size."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
        self.calls.append((threading.get_ident(), len(events)))
        super().store(events, **kwargs)


def _event(client: MeterClient, n: int = 1) -> UsageEvent:
    return client.event(tenant_id="acme", meter_id="page.processed.basic", total_usage=n)


def test_a_full_queue_spills_to_the_store_in_a_worker_thread() -> None:
    transport, store = GatedTransport(), WatchedStore()  # the backend holds every send
    client = client_with(transport, failure_store=store, max_queue=3, batch_size=1)
    try:
        assert not client.enqueue_blocks()
        for _ in range(10):
            if client.enqueue_blocks():
                break
            client.enqueue(_event(client))
        assert client.enqueue_blocks() and store.calls == []

        async def main() -> int:
            await client.aenqueue(_event(client))
            await client.aenqueue_many([_event(client), _event(client)])
            return threading.get_ident()

        loop_thread = asyncio.run(main())
        # (the sender may free one place meanwhile: at least the later ones spill)
        assert store.calls
        assert all(thread != loop_thread for thread, _ in store.calls)
    finally:
        transport.gate.set()
        client.close(5)


def test_a_durable_unit_of_work_is_stored_whole_even_if_its_task_is_cancelled() -> None:
    transport, store = GatedTransport(), WatchedStore()
    client = client_with(transport, failure_store=store, durable=True)
    events = [_event(client, n) for n in range(1, 301)]

    async def main() -> None:
        task = asyncio.create_task(client.aenqueue_many(events))
        await asyncio.sleep(0)  # the write is handed off
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 5  # (the write may still run on its thread)
        while not store.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [size for _, size in store.calls] == [300]
        assert {e.event.total_usage for e in store.events()} == set(range(1, 301))
    finally:
        transport.gate.set()
        client.close(5)


class GatedStore(WatchedStore):
    """A store whose writes wait for ``gate`` (a disk or database lock held elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
        self.gate.wait(10)
        super().store(events, **kwargs)


def test_writes_of_cancelled_callers_outlive_the_event_loop_and_flush_waits_for_them() -> None:
    transport, store = GatedTransport(), GatedStore()
    client = client_with(transport, failure_store=store, durable=True)
    writes = 12  # more than any thread pool here runs at once: some wait in its queue

    async def main() -> None:
        tasks = [
            asyncio.create_task(client.aenqueue_many([_event(client, n), _event(client, n)]))
            for n in range(1, writes + 1)
        ]
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()  # a request timeout, a server shutting down
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(main())  # the loop is gone; the writes are still waiting for the lock
        assert store.calls == [] or len(store.calls) < writes
        store.gate.set()
        transport.gate.set()
        assert client.flush(10)  # waits for the handed-off writes first
        assert sorted(size for _, size in store.calls) == [2] * writes
        delivered = [v["total_usage"] for v in transport.values()]
        assert sorted(delivered) == sorted([*range(1, writes + 1)] * 2)
    finally:
        store.gate.set()
        transport.gate.set()
        client.close(5)


class FlakyStore(MemoryFailureStore):
    """A store whose first ``failures`` writes fail (a database restarting)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreError("the database is restarting")
        super().store(events, **kwargs)


def test_events_kept_in_memory_while_the_store_failed_move_to_it_once_it_works() -> None:
    store = FlakyStore(failures=1)
    client = client_with(DownTransport(), failure_store=store, max_retries=0)
    try:
        first = client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        deadline = time.monotonic() + 5
        while client.stats()["failed_in_memory"] < 1:  # the store failed: kept in memory
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=2)
        while {e.event.event_id for e in store.events()} != {first, second}:
            assert time.monotonic() < deadline, store.events()
            time.sleep(0.01)
        assert client.stats()["failed_in_memory"] == 0
    finally:
        client.close(1)


def test_close_moves_events_kept_in_memory_to_a_store_that_works_again() -> None:
    store = FlakyStore(failures=1)
    client = client_with(DownTransport(), failure_store=store, max_retries=0)
    event_id = client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    deadline = time.monotonic() + 5
    while client.stats()["failed_in_memory"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.close(1)
    assert [e.event.event_id for e in store.events()] == [event_id]
    assert client.stats()["failed_in_memory"] == 0


def test_flush_from_a_hook_on_a_write_thread_does_not_wait_for_its_own_write() -> None:
    waited: list[float] = []

    def hook(event: UsageEvent) -> UsageEvent:
        started = time.monotonic()
        client.flush(3)  # a hook that flushes: it runs inside the write it would wait for
        waited.append(time.monotonic() - started)
        return event

    transport = GatedTransport()
    transport.gate.set()
    client = client_with(transport, failure_store=WatchedStore(), durable=True,
                         before_send=hook)  # fmt: skip
    try:
        asyncio.run(client.aenqueue(_event(client)))
        assert waited and waited[0] < 2.5
    finally:
        client.close(5)


def test_events_kept_in_memory_are_offered_to_the_store_again_without_new_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The store was down when the batch failed; nothing fails after that, so no store
    # write comes to carry them there: the sender offers them again on its own.
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.2)
    store = FlakyStore(failures=1)
    client = client_with(DownTransport(), failure_store=store, max_retries=0)
    try:
        event_id = client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        deadline = time.monotonic() + 5
        while [e.event.event_id for e in store.events()] != [event_id]:
            assert time.monotonic() < deadline, client.stats()
            time.sleep(0.02)
        assert client.stats()["failed_in_memory"] == 0
    finally:
        client.close(1)
