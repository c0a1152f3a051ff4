"""The client while its failure store misbehaves: a file locked for longer than its busy
timeout, an unreadable row, a store failing at the same time as the backend. Delivery to
a healthy backend goes on, nothing already accepted is lost, and the log stays short."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import meter_core.sender as sender_module
from meter_core import (
    ConfigurationError,
    LogThrottle,
    MemoryFailureStore,
    MeterClient,
    SQLiteSpool,
    StoredEvent,
    StoreError,
    UsageEvent,
)
from meter_core.devserver import DevServer
from tests.core.conftest import wait_until
from tests.core.test_sender import RECORD, DownTransport, client_with


def test_a_store_slow_to_fail_does_not_hold_up_delivery(
    backend: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_client: Any
) -> None:
    # Another connection holds the spool's write lock (a backup, a long transaction), so
    # every write waits its whole busy timeout, then fails. An event that fails for good
    # meanwhile is kept in memory and offered to the store again and again: those offers
    # must not stall the delivery of the other events to the healthy backend.
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.1)
    backend.remove_customer("ghost")
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, busy_timeout=1.5)
    spool.counts()  # (creates the file)
    client = make_client(failure_store=spool, max_retries=0)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        client.record(tenant_id="ghost", meter_id="page.processed.basic", total_usage=1)
        wait_until(lambda: client.stats()["failed_in_memory"] == 1)
        recorded_at: dict[str, float] = {}
        for _ in range(30):  # 3 s: the offers (each waits 1.5 s) run meanwhile
            recorded_at[client.record(**RECORD)] = time.monotonic()
            time.sleep(0.1)
        wait_until(lambda: set(recorded_at) <= set(backend.event_ids()))
        arrived_at = time.monotonic()
        # Each event was delivered within the flush interval, not a busy timeout later
        # (before: held up to 1.5 s, behind each offer on the sender thread).
        latest = {r["value"]["event_id"]: r["received_at"] for r in backend.records}
        offset = time.time() - time.monotonic()
        delays = [latest[e] - offset - t for e, t in recorded_at.items()]
        assert max(delays) < 0.8, sorted(delays)[-5:]
        assert arrived_at - max(recorded_at.values()) < 0.8
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # the store works again: the event kept in memory reaches it at the next offer
    wait_until(lambda: client.stats()["failed_in_memory"] == 0)
    assert spool.pending_count() == 1
    spool.close()


def test_an_unreadable_spool_row_is_set_aside_and_the_others_are_claimed(
    tmp_path: Path,
) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db")
    good = UsageEvent("acme", "dev-1", "page.processed.basic", 2)
    spool.store([good])
    bad_id = "0190b3c2-0000-8000-8000-000000000001"
    now = time.time()
    with (
        contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn,
        conn,
    ):  # written by another tool
        conn.execute(
            "INSERT INTO meter_events (event_id, payload, tenant_id, meter_id, status, attempts,"
            " last_error, next_attempt_at, created_at, updated_at)"
            " VALUES (?, ?, 'acme', 'page.processed.basic', 'queued', 0, '', ?, ?, ?)",
            (bad_id, json.dumps({"event_id": bad_id, "usage": 3}), now - 1, now, now),
        )
    # the bad row is due first and fills the limit: the claim looks again past it
    claimed = spool.claim(1, lease_seconds=60)
    assert [s.event.event_id for s in claimed] == [good.event_id]
    assert spool.claim(10, lease_seconds=60) == []  # set aside, not due again
    assert spool.counts()["by_reason"] == {"discarded: unreadable payload": 1, "queued": 1}
    spool.close()


class ClaimFailsStore(MemoryFailureStore):
    """A custom store whose claim fails with an error that is not a StoreError."""

    def claim(self, limit: int, **kwargs: Any) -> list[StoredEvent]:
        raise KeyError("payload")


def test_a_claim_failing_with_any_error_still_delivers_the_batch_taken_from_memory() -> None:
    # A full queue spills to the store, so the sender claims from it after taking a
    # batch off the queue: a claim that fails must not lose that batch.
    transport = DownTransport()
    transport.up.set()
    client = client_with(transport, failure_store=ClaimFailsStore(), max_queue=20,
                         flush_interval=5)  # fmt: skip
    try:
        ids = [client.record(**RECORD) for _ in range(30)]  # 20 queued, 10 spilled
        client.wake()
        wait_until(lambda: len(transport.records) >= 20)
        delivered = {r["value"]["event_id"] for r in transport.records}
        assert set(ids[:20]) <= delivered
        assert client.stats()["sent"] >= 20
    finally:
        client.close(1)


class LockedStore(MemoryFailureStore):
    def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
        raise StoreError("database is locked")


def test_a_full_queue_with_a_failing_store_logs_a_line_not_one_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = client_with(DownTransport(), failure_store=LockedStore(), max_queue=10)
    try:
        with caplog.at_level(logging.ERROR, logger="meter"):
            for _ in range(500):
                client.record(**RECORD)
        full = [r for r in caplog.records if "queue is full" in r.getMessage()]
        assert len(full) == 1 and full[0].exc_info is None
        assert "the failure store failed" in full[0].getMessage()
        assert "database is locked" in full[0].getMessage()
        assert "no failure store is set" not in caplog.text
        assert client.stats()["dropped"] >= 490
    finally:
        client.close(0)


def test_a_spill_to_a_spool_locked_elsewhere_waits_a_second_not_its_busy_timeout(
    tmp_path: Path,
) -> None:
    # The queue is full (the backend down long enough) and another process holds the
    # spool's lock: each spill, in the caller's thread (a request's), waited the spool's
    # 30 s busy timeout, then dropped the event anyway.
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path)
    spool.counts()  # (creates the file)
    client = client_with(DownTransport(), failure_store=spool, max_queue=3, batch_size=1000,
                         flush_interval=30)  # fmt: skip
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        for _ in range(3):
            client.record(**RECORD)
        locker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        client.record(**RECORD)  # the queue is full: spilled, to a locked spool
        assert time.monotonic() - started < 3
        assert client.stats()["dropped"] == 1
        locker.execute("ROLLBACK")
        locker.execute("BEGIN EXCLUSIVE")
        threading.Timer(0.3, locker.execute, ["ROLLBACK"]).start()
        client.record(**RECORD)  # a lock held for a moment is still waited for
        assert client.stats()["dropped"] == 1
        assert spool.pending_count() == 1
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
        client.close(0)


def test_durable_record_after_close_raises_when_the_store_fails() -> None:
    # Durable mode accepts an event only once it is in the store, closed or not: kept
    # in memory after close, nothing would ever send it.
    client = client_with(DownTransport(), failure_store=LockedStore(), durable=True)
    client.close(0)
    with pytest.raises(StoreError, match="locked"):
        client.record(**RECORD)
    assert client.stats()["failed_in_memory"] == 0


def test_durable_record_after_close_is_stored() -> None:
    store = MemoryFailureStore()
    client = client_with(DownTransport(), failure_store=store, durable=True)
    client.close(0)
    event_id = client.record(**RECORD)
    assert [s.event.event_id for s in store.events()] == [event_id]
    stats = client.stats()  # as before close: a durable event's own write is not "stored"
    assert stats["recorded"] == 1 and stats["stored"] == 0


class FlakyStore(MemoryFailureStore):
    def __init__(self) -> None:
        super().__init__()
        self.broken = threading.Event()
        self.broken.set()

    def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
        if self.broken.is_set():
            raise StoreError("the database is restarting")
        super().store(events, **kwargs)


def test_events_kept_in_memory_count_as_stored_once_they_reach_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.1)
    store = FlakyStore()
    client: MeterClient = client_with(DownTransport(), failure_store=store, max_retries=0)
    try:
        client.record(**RECORD)
        wait_until(lambda: client.stats()["failed_in_memory"] == 1)
        assert client.stats()["stored"] == 0  # in memory, not in the store
        store.broken.clear()
        wait_until(lambda: client.stats()["failed_in_memory"] == 0)
        assert client.stats()["stored"] == 1 and len(store.events()) == 1
    finally:
        client.close(0)


def test_failed_offers_to_the_store_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_MAX_SECONDS", 0.4)
    offers: list[float] = []

    class CountingStore(FlakyStore):
        def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
            offers.append(time.monotonic())
            super().store(events, **kwargs)

    store = CountingStore()
    client = client_with(DownTransport(), failure_store=store, max_retries=0)
    try:
        client.record(**RECORD)
        time.sleep(2.0)
        gaps = [b - a for a, b in itertools.pairwise(offers[1:])]  # (the first: the failed batch)
        # 0.05, 0.1, 0.2, then 0.4 s apart: a handful of offers, not one per cycle (0.02 s)
        assert 4 <= len(offers) <= 10, offers
        assert gaps[-1] >= 0.35
    finally:
        store.broken.clear()
        client.close(0)


def test_durable_events_held_on_a_store_error_only_when_the_caller_asks() -> None:
    transport = DownTransport()
    transport.up.set()
    client = client_with(transport, failure_store=LockedStore(), durable=True)
    try:
        events = [client.event(**RECORD) for _ in range(3)]
        with pytest.raises(StoreError):
            client.enqueue_many(events)  # a caller that can report it: raised, not kept
        assert transport.records == []
        # an adapter after its response: queued in memory and sent as in default mode
        client.enqueue_many(events, hold_on_store_error=True)
        assert client.flush(5)
        assert {r["value"]["event_id"] for r in transport.records} == {e.event_id for e in events}
        assert client.stats()["failed_in_memory"] == 0
    finally:
        client.close(0)


def test_durable_events_held_after_close_are_kept_in_memory_and_listed() -> None:
    client = client_with(DownTransport(), failure_store=LockedStore(), durable=True)
    client.close(0)
    events = [client.event(**RECORD) for _ in range(2)]
    client.enqueue_many(events, hold_on_store_error=True)  # (a request ending at shutdown)
    assert {s.event.event_id for s in client.failed_events()} == {e.event_id for e in events}


def test_close_does_not_wait_past_its_timeout_for_an_offer_on_a_slow_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.05)
    trying = threading.Event()

    class SlowToFail(MemoryFailureStore):
        def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> None:
            trying.set()
            time.sleep(3)  # a file locked for its whole busy timeout
            raise StoreError("database is locked")

    client = client_with(DownTransport(), failure_store=SlowToFail(), max_retries=0)
    client.record(**RECORD)  # fails, its store write fails slowly: kept in memory
    wait_until(lambda: client.stats()["failed_in_memory"] == 1)
    trying.clear()
    wait_until(trying.is_set)  # an offer is on its way, holding the drain
    started = time.monotonic()
    client.close(timeout=0.3)
    assert time.monotonic() - started < 2.0
    assert client.stats()["failed_in_memory"] == 1  # still listed, not lost silently


class Interrupt(BaseException):
    """What some libraries raise out of any code (gevent's Timeout): not an Exception."""


def test_a_base_exception_from_the_transport_does_not_stop_delivery() -> None:
    calls: list[int] = []

    class InterruptOnce(DownTransport):
        def produce(self, records: Any) -> Any:
            if not calls:  # the first batch: interrupted mid-send
                calls.append(0)
                raise Interrupt
            return super().produce(records)

    transport = InterruptOnce()
    transport.up.set()
    client = client_with(transport, max_retries=0)
    try:
        first = client.record(**RECORD)
        wait_until(lambda: calls)
        later = client.record(**RECORD)  # the sender thread is still there to send it
        wait_until(lambda: later in {r["value"]["event_id"] for r in transport.records})
        # the interrupted batch was not lost: kept for the retry command
        wait_until(lambda: first in {s.event.event_id for s in client.failed_events()})
    finally:
        client.close(1)


def test_a_store_that_cannot_be_read_is_logged_once_per_interval_not_per_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = DownTransport()
    transport.up.set()
    client = client_with(transport, failure_store=ClaimFailsStore(), max_queue=5)
    try:
        with caplog.at_level(logging.ERROR, logger="meter"):
            for _ in range(10):  # 5 spill to the store: the sender claims at every poll
                client.record(**RECORD)
            time.sleep(0.5)  # some 25 polls of 0.02 s
        lines = [r for r in caplog.records if "could not read the failure store" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None
        assert "KeyError" in lines[0].getMessage()
    finally:
        client.close(0)


def test_many_unreadable_spool_rows_log_one_line_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a spool written by another version can hold many: one line a minute, not one each)
    import meter_core.spool

    monkeypatch.setattr(meter_core.spool, "_unreadable_log", LogThrottle(meter_core.spool.logger))
    spool = SQLiteSpool(tmp_path / "spool.db")
    spool.store([UsageEvent("acme", "dev-1", "page.processed.basic", 2)])
    now = time.time()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn, conn:
        for n in range(30):
            bad_id = f"0190b3c2-0000-8000-8000-{n:012d}"
            conn.execute(
                "INSERT INTO meter_events (event_id, payload, tenant_id, meter_id, status,"
                " attempts, last_error, next_attempt_at, created_at, updated_at)"
                " VALUES (?, ?, 'acme', 'page.processed.basic', 'queued', 0, '', ?, ?, ?)",
                (bad_id, json.dumps({"event_id": bad_id, "usage": 3}), now - 1, now, now),
            )
    with caplog.at_level(logging.ERROR, logger="meter"):
        assert len(spool.claim(100, lease_seconds=60)) == 1
    lines = [r for r in caplog.records if "unreadable payload" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is not None
    assert spool.counts()["by_status"]["discarded"] == 30
    spool.close()


def test_flush_after_close_answers_at_once_with_events_left_in_the_store(
    backend: DevServer, tmp_path: Path
) -> None:
    # An app's lifespan closed its client; a middleware flushes it afterwards, with end
    # events of sessions recorded after the close waiting in the spool for the retry
    # command: nothing will send them from here, so flush() has nothing to wait for.
    spool = SQLiteSpool(tmp_path / "s.db")
    client = MeterClient(backend.url, internal_url=backend.url, device_id="d",
                         failure_store=spool, durable=True)  # fmt: skip
    client.record(**RECORD)
    assert client.flush(5)
    client.close(5)
    assert len(backend.event_ids()) == 1
    client.record(**RECORD)  # after close: stored
    started = time.monotonic()
    assert client.flush(3) is True  # nothing in memory; the row is the retry command's
    assert time.monotonic() - started < 1.0
    assert spool.pending_count() == 1


def test_close_says_how_many_events_a_failing_store_leaves_only_in_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = client_with(DownTransport(), failure_store=LockedStore(), max_retries=0)
    for _ in range(3):
        client.record(**RECORD)
    with caplog.at_level(logging.ERROR, logger="meter"):
        client.close(2)
    assert client.stats()["failed_in_memory"] == 3
    assert "3 usage events are held only in memory at close" in caplog.text
    assert "lost when the process exits" in caplog.text


def test_clients_of_two_topics_sharing_a_spool_send_only_their_own_events(
    tmp_path: Path,
) -> None:
    # Two apps on one host with the same METER_SPOOL_PATH: each claims its own events
    # from the file (before, each sent the other's to its own backend and topic).
    us, eu = DevServer().start(), DevServer(topic="eu-usage").start()
    path = str(tmp_path / "shared.db")
    clients = [
        MeterClient(us.url, internal_url=us.url, device_id="us", durable=True,
                    spool_path=path, flush_interval=0.02),
        MeterClient(eu.url, internal_url=eu.url, device_id="eu", durable=True,
                    spool_path=path, topic="eu-usage", flush_interval=0.02),
    ]  # fmt: skip
    try:
        for client in clients:
            for _ in range(20):
                client.record(**RECORD)
        for client in clients:
            assert client.flush(10)
        deadline = time.monotonic() + 10
        while len(us.records) + len(eu.records) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {r["value"]["device_id"] for r in us.records} == {"us"}
        assert {r["value"]["device_id"] for r in eu.records} == {"eu"}
        assert len(us.event_ids()) == len(eu.event_ids()) == 20
    finally:
        for client in clients:
            client.close(5)
        us.stop()
        eu.stop()


def test_a_spool_given_to_a_client_is_bound_to_its_topic(tmp_path: Path) -> None:
    # failure_store=SQLiteSpool(path), as the README shows it: the spool takes the
    # client's topic (unbound, it kept events without one and handed out every topic's)
    path = tmp_path / "s.db"
    us_spool, eu_spool = SQLiteSpool(path), SQLiteSpool(path)
    us = MeterClient("http://127.0.0.1:9", device_id="d", failure_store=us_spool)
    eu = MeterClient("http://127.0.0.1:9", device_id="d", failure_store=eu_spool,
                     topic="eu-usage")  # fmt: skip
    assert (us_spool.topic, eu_spool.topic) == ("usage-events", "eu-usage")
    us_spool.store([UsageEvent("us-tenant", "d", "page.processed.basic", 1)])
    eu_spool.store([UsageEvent("eu-tenant", "d", "page.processed.basic", 1)])
    assert [s.event.tenant_id for s in eu_spool.claim(10)] == ["eu-tenant"]
    with pytest.raises(ConfigurationError, match="keeps events of topic 'eu-usage'"):
        MeterClient("http://127.0.0.1:9", device_id="d", failure_store=eu_spool)
    us.close(0)
    eu.close(0)
