"""SQLiteSpool and the in-memory store: the failure-store protocol, across processes."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meter_core import (
    ConfigurationError,
    FailureStore,
    MemoryFailureStore,
    MeterClient,
    SQLiteSpool,
    StoreError,
    UsageEvent,
)


def events(n: int, tenant: str = "acme") -> list[UsageEvent]:
    return [UsageEvent(tenant, "dev", "page.processed.basic", i) for i in range(n)]


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FailureStore:
    if request.param == "sqlite":
        return SQLiteSpool(tmp_path / "spool.db")
    return MemoryFailureStore(1000)


def test_both_stores_implement_the_protocol(store: FailureStore) -> None:
    assert isinstance(store, FailureStore)


def test_store_claim_deliver(store: FailureStore) -> None:
    batch = events(3)
    store.store(batch)
    claimed = store.claim(10)
    assert sorted(s.event.event_id for s in claimed) == sorted(e.event_id for e in batch)
    assert all(s.status == "queued" and s.attempts == 0 for s in claimed)
    assert claimed[0].event == next(e for e in batch if e.event_id == claimed[0].event.event_id)
    assert store.claim(10) == []  # leased
    store.mark_delivered([e.event_id for e in batch])
    assert store.counts()["by_status"].get("queued", 0) == 0


def test_storing_twice_keeps_one_row(store: FailureStore) -> None:
    (event,) = events(1)
    store.store([event])
    store.store([event], error="boom", attempts=6)
    claimed = store.claim(10)
    assert len(claimed) == 1
    assert claimed[0].status == "failed"
    assert claimed[0].attempts == 6
    assert claimed[0].last_error == "boom"


def test_failed_events_wait_for_their_next_attempt(store: FailureStore) -> None:
    batch = events(2)
    store.store(batch, error="down", attempts=1)
    claimed = store.claim(10)
    assert len(claimed) == 2
    store.mark_failed([batch[0].event_id], error="still down", next_attempt_at=time.time() + 60)
    store.release([batch[1].event_id])
    again = store.claim(10)
    assert [s.event.event_id for s in again] == [batch[1].event_id]
    counts = store.counts()
    assert counts["by_status"]["failed"] == 2
    assert counts["by_reason"]["failed: still down"] == 1


def test_claim_filters(store: FailureStore) -> None:
    store.store(events(2, "a") + events(3, "b"))
    store.store([UsageEvent("a", "d", "report.generated.small", 1)], error="x", attempts=9)
    assert len(store.claim(10, tenant_id="b")) == 3
    assert len(store.claim(10, meter_id="report.generated.small")) == 1
    assert len(store.claim(10, max_attempts=1)) == 2


def test_an_expired_lease_makes_events_due_again(store: FailureStore) -> None:
    store.store(events(1))
    assert len(store.claim(10, lease_seconds=0.05)) == 1
    assert store.claim(10) == []
    time.sleep(0.1)
    assert len(store.claim(10)) == 1


def test_memory_store_is_bounded_and_counts_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryFailureStore(max_events=5)
    store.store(events(8), error="down")
    assert len(store) == 5
    assert store.dropped == 3
    assert "dropped 3 undelivered events" in caplog.text
    assert caplog.records[-1].levelname == "ERROR"
    # one event at a time (each failing alone: tenants without an account): one line
    # per interval, not one per event
    caplog.clear()
    for event in events(200):
        store.store([event], error="no account")
    assert store.dropped == 203
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) <= 1


def test_spool_creates_nothing_until_used(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "spool.db"
    spool = SQLiteSpool(path)
    assert not path.exists()
    spool.store(events(1))
    assert path.exists()


def test_spool_is_in_wal_mode(tmp_path: Path) -> None:
    import sqlite3

    spool = SQLiteSpool(tmp_path / "s.db")
    spool.store(events(1))
    conn = sqlite3.connect(tmp_path / "s.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_spool_errors_are_store_errors(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match=r"dir\.db"):
        SQLiteSpool(tmp_path / "dir.db").store(events(1))
    # a folder that cannot be made (a part of the path is a file): OSError, as StoreError
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match="a-file"):
        SQLiteSpool(tmp_path / "a-file" / "sub" / "spool.db").store(events(1))


def test_a_database_of_something_else_is_left_untouched(tmp_path: Path) -> None:
    # A spool path pointed at the app's own SQLite database by mistake.
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"database of something else \(tables users; "):
        SQLiteSpool(path).store(events(1))
    conn = sqlite3.connect(path)
    try:
        tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
        assert tables == [("users",)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()
    # an empty file (made by hand) becomes a spool
    (tmp_path / "empty.db").write_bytes(b"")
    SQLiteSpool(tmp_path / "empty.db").store(events(1))


def test_spools_of_two_topics_share_a_file_each_handing_out_its_own(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    usage, eu = SQLiteSpool(path, topic="usage-events"), SQLiteSpool(path, topic="eu-usage")
    usage.store(events(3, tenant="us-tenant"))
    eu.store(events(2, tenant="eu-tenant"))
    assert {s.event.tenant_id for s in eu.claim(10, lease_seconds=60)} == {"eu-tenant"}
    assert len(usage.claim(10, lease_seconds=60)) == 3
    assert usage.counts()["owed_by_topic"] == {"usage-events": 3, "eu-usage": 2}


def test_a_spool_made_before_topics_gets_the_column_and_hands_its_events_to_any(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    old_schema = [  # (the table as versions without topics made it)
        "event_id TEXT PRIMARY KEY", "payload TEXT NOT NULL", "tenant_id TEXT NOT NULL",
        "meter_id TEXT NOT NULL", "status TEXT NOT NULL", "attempts INTEGER NOT NULL DEFAULT 0",
        "last_error TEXT NOT NULL DEFAULT ''", "next_attempt_at REAL NOT NULL",
        "claimed_until REAL NOT NULL DEFAULT 0", "claim_token TEXT",
        "created_at REAL NOT NULL", "updated_at REAL NOT NULL",
    ]  # fmt: skip
    conn.execute(f"CREATE TABLE meter_events ({', '.join(old_schema)})")
    (event,) = events(1)
    conn.execute(
        "INSERT INTO meter_events (event_id, payload, tenant_id, meter_id, status,"
        " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, 'queued', 0, 0, 0)",
        (event.event_id, json.dumps(event.to_dict()), event.tenant_id, event.meter_id),
    )
    conn.commit()
    conn.close()
    spool = SQLiteSpool(path, topic="eu-usage")
    spool.store(events(1, tenant="eu-tenant"))
    claimed = spool.claim(10, lease_seconds=60)
    assert sorted(s.event.tenant_id for s in claimed) == ["acme", "eu-tenant"]
    assert spool.counts()["owed_by_topic"] == {"": 1, "eu-usage": 1}


def test_a_spool_file_removed_while_in_use_is_made_again_with_what_it_owed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A cleaner of old files in /tmp, or an operator, removes the file the connection
    # holds open: events written after that went to a file no one could reach.
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path)
    first = events(3)
    spool.store(first)
    spool.mark_delivered([first[0].event_id])
    for suffix in ("", "-wal", "-shm"):
        os.remove(f"{path}{suffix}")
    later = events(2)
    with caplog.at_level(logging.WARNING, logger="meter.spool"):
        spool.store(later)
    assert "removed or replaced while in use" in caplog.text
    reader = SQLiteSpool(path)  # (another process's view: the file at the path)
    owed = {s.event.event_id for s in reader.claim(10, lease_seconds=60)}
    assert owed == {e.event_id for e in first[1:] + later}
    reader.close()
    spool.close()


def _remove_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}{suffix}")


def test_a_removed_spool_whose_new_file_cannot_be_written_keeps_its_events(
    tmp_path: Path,
) -> None:
    # The path holds another app's database when the removal is found: the owed events
    # stay with the old connection, and move once a spool can be made there again.
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path)
    owed = events(3)
    spool.store(owed)
    _remove_files(path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="database of something else"):
        spool.store(events(1))
    _remove_files(path)
    later = events(1)
    spool.store(later)
    reader = SQLiteSpool(path)
    claimed = {s.event.event_id for s in reader.claim(10, lease_seconds=60)}
    assert claimed == {e.event_id for e in owed + later}
    reader.close()
    spool.close()


def test_a_removed_spool_found_by_two_processes_moves_its_events_once(tmp_path: Path) -> None:
    # Each process finds the removal at its next call: the second must not bring back
    # the events the first moved and delivered meanwhile.
    path = tmp_path / "spool.db"
    first, second = SQLiteSpool(path), SQLiteSpool(path)  # (a connection each)
    owed = events(4)
    first.store(owed)
    assert second.pending_count() == 4
    _remove_files(path)
    claimed = first.claim(10, lease_seconds=60)
    assert len(claimed) == 4
    first.mark_delivered([s.event.event_id for s in claimed])
    assert second.pending_count() == 0  # found the removal too: nothing left to move
    assert second.claim(10, lease_seconds=60) == []
    first.close()
    second.close()


def test_a_bounded_wait_leaves_the_busy_timeout_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, busy_timeout=5)
    spool.counts()
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with spool.lock_wait_until(time.monotonic()), pytest.raises(StoreError):
            spool.store(events(1))  # (half a second, then refused)
        # a call outside the block waits its busy timeout again: the lock, let go in
        # 1.5 s, is waited for
        threading.Timer(1.5, locker.execute, ["ROLLBACK"]).start()
        started = time.monotonic()
        spool.store(events(1))
        assert time.monotonic() - started > 1.2
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
    assert spool.pending_count() == 1
    spool.close()


def test_a_relative_spool_path_is_kept_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # read again after a chdir, it would name another file (taken for a replaced one)
    monkeypatch.chdir(tmp_path)
    spool = SQLiteSpool("spool.db")
    spool.store(events(2))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    spool.store(events(1))
    assert spool.path == tmp_path / "spool.db"
    assert spool.pending_count() == 3
    assert not (tmp_path / "elsewhere" / "spool.db").exists()
    spool.close()


_FORKED_SPOOL: list[SQLiteSpool] = []  # the spool a forked child inherits


def _store_one() -> None:
    _FORKED_SPOOL[0].store(events(1))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_waits_for_a_spool_transaction_so_the_child_can_write(tmp_path: Path) -> None:
    # A thread of the parent (the meter sender) is inside a spool transaction, waiting for
    # SQLite's write lock that another connection holds. Forked in the middle of it, a
    # child would inherit a held lock and SQLite's record of a lock it does not have, and
    # could never write the file; fork() waits for the transaction to end instead.
    path = tmp_path / "spool.db"
    spool = SQLiteSpool(path, busy_timeout=5)
    spool.store(events(1))
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    sender = threading.Thread(target=spool.store, args=(events(1),))
    sender.start()
    time.sleep(0.2)  # the thread is now inside the spool, waiting for the write lock
    threading.Timer(0.3, lambda: other.execute("ROLLBACK")).start()
    _FORKED_SPOOL[:] = [spool]
    child = multiprocessing.get_context("fork").Process(target=_store_one)
    child.start()
    child.join(20)
    sender.join(10)
    other.close()
    assert child.exitcode == 0
    assert spool.pending_count() == 3


def _claim_all(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    spool = SQLiteSpool(path)
    got: list[str] = []
    while True:
        claimed = spool.claim(7)
        if not claimed:
            break
        got.extend(s.event.event_id for s in claimed)
        spool.mark_delivered([s.event.event_id for s in claimed])
    queue.put(got)


def test_concurrent_processes_never_claim_the_same_event(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    batch = events(600)
    SQLiteSpool(path).store(batch)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(path, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(10)
    claimed = [event_id for result in results for event_id in result]
    assert sorted(claimed) == sorted(e.event_id for e in batch)
    assert len(claimed) == len(set(claimed))
    assert SQLiteSpool(path).pending_count() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_two_threads_forking_at_once_leave_no_spool_lock_held(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "spool.db")
    spool.store(events(1))

    def fork_many() -> None:
        for _ in range(300):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

    threads = [threading.Thread(target=fork_many) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the threads' fork hooks interleave
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads), "a fork hung"
    lock = spool._process_lock()
    assert lock.acquire(timeout=1), "a fork left the spool's lock held"
    lock.release()
    assert spool.pending_count() == 1


def test_a_dropped_spool_closes_its_connection_even_on_the_thread_holding_the_lock(
    tmp_path: Path,
) -> None:
    # The collector may finalize a dropped spool on any thread, including one that holds
    # the closing lock at that moment (a fork hook): closing must not deadlock there.
    import gc

    from meter_core import spool as spool_module

    def drop_one_while_holding_the_lock() -> None:
        spool = SQLiteSpool(tmp_path / "spool.db")
        spool.store(events(1))
        with spool_module._closing_lock:
            del spool
            gc.collect()

    worker = threading.Thread(target=drop_one_while_holding_the_lock, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "closing a dropped spool's connection deadlocked"
    assert SQLiteSpool(tmp_path / "spool.db").pending_count() == 1


def test_a_path_that_cannot_be_written_is_logged_when_the_spool_is_built(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found at once, not at the first outage, when its events would stay in memory.
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.ERROR, logger="meter.spool"):
        SQLiteSpool(tmp_path / "new" / "folders" / "spool.db").close()  # made on first use
        assert caplog.records == []
        SQLiteSpool(tmp_path / "a-file" / "spool.db").close()
        SQLiteSpool(tmp_path).close()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "a-file' is not a folder" in messages[0] and "kept in memory only" in messages[0]
    assert "it is a folder" in messages[1]
    assert not (tmp_path / "new").exists()  # (building it made nothing)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="meter.spool"):  # (the command line's)
        SQLiteSpool(tmp_path / "a-file" / "spool.db", check_writable=False).close()
    assert caplog.records == []


@pytest.mark.parametrize("bad", [None, -1, 1.5, True, "10"])
def test_memory_store_refuses_a_bad_bound_when_built(bad: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        MemoryFailureStore(bad)
    assert str(caught.value) == (
        f"MemoryFailureStore(max_events): must be an int >= 0, got {bad!r}"
    )


def test_memory_store_of_zero_keeps_nothing_and_counts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # what a client built with max_failed_in_memory=0 (a documented option) asks for
    store = MemoryFailureStore(0)
    store.store(events(2), error="down")
    assert len(store) == 0
    assert store.dropped == 2
    assert "dropped 2 undelivered events" in caplog.text
    client = MeterClient(transport="memory", device_id="d", max_failed_in_memory=0)
    client.close()


def test_a_row_discarded_once_its_lease_ended_stays_discarded(tmp_path: Path) -> None:
    # A sender's late mark_failed() put a row an operator had discarded back to
    # "failed": claimed and sent again
    spool = SQLiteSpool(tmp_path / "s.db")
    event = UsageEvent("ghost", "d", "page.processed.basic", 1)
    spool.store([event], error="no customer account")
    assert len(spool.claim(1, lease_seconds=0.01)) == 1
    time.sleep(0.02)  # the lease is over
    assert spool.discard_owed(tenant_id="ghost") == 1
    spool.mark_failed([event.event_id], error="late", next_attempt_at=0)
    assert spool.claim(10) == []
    assert spool.counts()["by_status"] == {"discarded": 1}
