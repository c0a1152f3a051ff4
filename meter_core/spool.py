"""SQLiteSpool: a durable failure store in one SQLite file.

Safe for several threads and several processes on one host: the file is in WAL mode (a
reader never blocks the writer), every write is one short transaction, and a claim runs
in a ``BEGIN IMMEDIATE`` transaction, which holds SQLite's single write lock from the
moment it selects rows to the moment it leases them, so two claims can never return the
same event. ``synchronous=NORMAL`` keeps a committed write through a process crash
(SIGKILL); only a power loss can take the last transactions.

Delivered events are deleted, so the spool holds only what is still owed; its size is
the backlog.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meter_core.errors import ConfigurationError, InvalidEvent, StoreError
from meter_core.events import UsageEvent
from meter_core.store import DEFAULT_LEASE_SECONDS, DISCARDED, FAILED, QUEUED, StoredEvent
from meter_core.usage import LogThrottle

__all__ = ["SQLiteSpool"]

logger = logging.getLogger("meter.spool")
_unreadable_log = LogThrottle(logger, interval=60.0)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meter_events (
    event_id TEXT PRIMARY KEY,
    payload TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    meter_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    next_attempt_at REAL NOT NULL,
    claimed_until REAL NOT NULL DEFAULT 0,
    claim_token TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS meter_events_due ON meter_events (status, next_attempt_at);
"""


# fork() waits for every spool's transaction in progress to end: a child forked in the
# middle of one would inherit this lock held by a thread it does not have (and SQLite's
# record of a lock held by a connection it does not have).
_spools: weakref.WeakSet[SQLiteSpool] = weakref.WeakSet()
_spools_lock = threading.Lock()
# Held while a connection is closed, and across fork(): a spool dropped by the app has its
# connection closed by the garbage collector on any thread, outside the spool's own lock.
_closing_lock = threading.RLock()  # (the collector may run a finalizer on its holder)
# A connection inherited through fork belongs to the parent: the child never uses nor
# closes it (closing it would act on SQLite state shared with the parent); kept here.
_inherited: list[sqlite3.Connection] = []
_held_for_fork = threading.local()  # per thread: two threads may fork at once
_FORK_WAIT_SECONDS = 2.0
_LEAST_LOCK_WAIT = 0.5  # seconds a call waits for a lock within lock_wait_until()


def _before_fork() -> None:
    # Bounded: fork() also runs for subprocesses (which exec at once and need none of
    # this), and a transaction waiting on a file another process locks may take up to
    # the busy timeout. Past the bound the child still gets a lock of its own (see
    # _process_lock); only SQLite's own state may then be inherited mid-transaction.
    with _spools_lock:
        spools = list(_spools)
    held = _held_for_fork.locks = []
    for spool in spools:
        lock = spool._process_lock()
        if lock.acquire(timeout=_FORK_WAIT_SECONDS):
            held.append(lock)
    # last: a transaction holding its spool's lock may take this one to (re)connect
    if _closing_lock.acquire(timeout=_FORK_WAIT_SECONDS):
        held.append(_closing_lock)


def _after_fork_in_parent() -> None:
    held = getattr(_held_for_fork, "locks", [])
    while held:
        held.pop().release()


def _after_fork_in_child() -> None:
    global _spools_lock, _closing_lock
    # another thread of the parent may have held them
    _spools_lock, _closing_lock = threading.Lock(), threading.RLock()
    _held_for_fork.locks = []  # the child's spools take new locks (see _process_lock)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


class _Connection:
    """A spool's connection and the process that opened it; closed by a finalizer when
    the spool is dropped, under the closing lock."""

    __slots__ = ("conn", "ident", "pid")

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.pid = 0
        self.ident: tuple[int, int] | None = None  # (device, inode) of the file it opened

    def drop(self) -> None:
        with _closing_lock:
            conn, self.conn = self.conn, None
            if conn is None:
                return
            if self.pid == os.getpid():
                conn.close()
            else:
                _inherited.append(conn)


class SQLiteSpool:
    """A :class:`~meter_core.FailureStore` in the SQLite file at ``path``.

    The file and its table are created on first use (not in the constructor, so building
    a client does no I/O). One connection per process, opened again after ``fork``.
    Errors of sqlite3 are raised as :class:`~meter_core.StoreError`. The constructor only
    looks at the path (no file is made): one that cannot be written (a folder that is
    read-only, a part of it that is a file) is logged as an error at once, rather than
    found at the first outage, when the events it should keep stay in memory
    (``check_writable=False``: not looked at, for a tool that only reads it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 30.0,
        topic: str | None = None,
        check_writable: bool = True,
    ) -> None:
        if topic is not None and (not isinstance(topic, str) or not topic):
            raise ConfigurationError(f"SQLiteSpool(topic): must be a non-empty str, got {topic!r}")
        # (absolute: a relative path read again after a chdir would name another file)
        self.path = Path(os.path.abspath(path))
        #: The topic of the events this spool keeps and hands out: several clients that
        #: send to different topics may share a file, each claiming its own events only.
        #: None: events are kept without one, and every event is handed out.
        self.topic = topic
        self._busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._lock_pid = os.getpid()
        self._deadline = threading.local()  # see lock_wait_until()
        self._connection = _Connection()
        weakref.finalize(self, self._connection.drop)
        with _spools_lock:
            _spools.add(self)
        problem = _unwritable(self.path) if check_writable else ""
        if problem:
            logger.error(
                "spool %r cannot be written (%s): events the backend does not take will be "
                "kept in memory only, and lost with the process",
                str(self.path),
                problem,
            )

    def __repr__(self) -> str:
        return f"SQLiteSpool({str(self.path)!r})"

    def _connect(self, wait: float | None = None) -> sqlite3.Connection:
        """This process's connection, its busy timeout set to ``wait`` seconds when given
        (the caller sets it back)."""
        current = self._connection
        if current.conn is not None and current.pid == os.getpid():
            if _file_ident(self.path) == current.ident:
                if wait is not None:
                    current.conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
                return current.conn
            return self._reopen_removed(current, wait)
        current.drop()  # one inherited through fork is kept, never used
        return self._open(current, wait)

    def _reopen_removed(self, current: _Connection, wait: float | None) -> sqlite3.Connection:
        """The file was removed (a cleaner of old files in /tmp, an operator) or replaced
        while open: events written since would go to a file no one can reach. Open the
        path again and move the owed events the old file still holds into the new one
        (moved: another process that finds the removal later has none left to copy, so
        none it delivered meanwhile comes back). If the new file cannot be opened or
        written, the old connection is kept and the call fails: the next one tries
        again."""
        old = current.conn
        assert old is not None
        new, ident = self._new_connection(wait)
        try:
            moved = _move_owed(old, new, str(self.path))
        except BaseException:
            new.close()
            raise
        current.drop()
        current.conn, current.pid, current.ident = new, os.getpid(), ident
        logger.warning(
            "spool %r was removed or replaced while in use: opened again, with the %d "
            "events still owed that it held",
            str(self.path),
            moved,
        )
        return new

    def _open(self, current: _Connection, wait: float | None) -> sqlite3.Connection:
        conn, ident = self._new_connection(wait)
        current.conn, current.pid, current.ident = conn, os.getpid(), ident
        return conn

    def _new_connection(
        self, wait: float | None
    ) -> tuple[sqlite3.Connection, tuple[int, int] | None]:
        """A connection to the file at the path (made if missing, given the schema), and
        the file's (device, inode)."""
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout if wait is None else wait,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            _refuse_foreign_database(conn, self.path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            _add_topic_column(conn)
        except BaseException:
            conn.close()
            raise
        return conn, _file_ident(self.path)

    def _process_lock(self) -> threading.RLock:
        """This process's lock. A child forked while a thread of the parent held the lock
        inherits it held, by a thread that does not exist there: it takes a new one."""
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = threading.RLock(), os.getpid()
        return self._lock

    @contextmanager
    def lock_wait_until(self, deadline: float | None) -> Iterator[None]:
        """Within the block, calls of this thread wait for a lock on the file (another
        process's transaction, another thread's call) until ``deadline`` at most
        (``time.monotonic()``; None: the busy timeout, as outside the block), or half a
        second when that is later (a lock held for a moment, by the sender's own claim
        say, is still waited for), then raise StoreError: for a ``close()`` given a
        timeout, which must not wait out a busy timeout of 30 s."""
        previous = getattr(self._deadline, "value", None)
        self._deadline.value = deadline
        try:
            yield
        finally:
            self._deadline.value = previous

    @contextmanager
    def _transaction(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        deadline: float | None = getattr(self._deadline, "value", None)
        if deadline is not None:
            deadline = max(deadline, time.monotonic() + _LEAST_LOCK_WAIT)
        lock = self._process_lock()
        if deadline is None:
            lock.acquire()
        elif not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise StoreError(
                f"spool {str(self.path)!r}: still in use by another thread at the deadline"
            )
        try:
            wait = None if deadline is None else max(0.001, deadline - time.monotonic())
            conn = self._connect(wait)
            try:
                conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                if wait is not None:
                    conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        except (sqlite3.Error, OSError) as exc:
            # OSError: the file or its folder cannot be made (read-only, a path part
            # that is a file...); callers handle StoreError, the store's one error type
            raise StoreError(f"spool {str(self.path)!r}: {exc}") from exc
        finally:
            lock.release()

    def store(
        self,
        events: Sequence[UsageEvent],
        *,
        error: str = "",
        attempts: int = 0,
        next_attempt_at: float | None = None,
    ) -> None:
        if not events:
            return
        now = time.time()
        due = now if next_attempt_at is None else next_attempt_at
        status = FAILED if error else QUEUED
        topic = self.topic
        rows = [
            (e.event_id, json.dumps(e.to_dict()), e.tenant_id, e.meter_id, status, attempts,
             error, due, now, now, topic)
            for e in events
        ]  # fmt: skip
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO meter_events (event_id, payload, tenant_id, meter_id, status,"
                " attempts, last_error, next_attempt_at, created_at, updated_at, topic)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (event_id) DO UPDATE SET status = excluded.status,"
                " attempts = max(attempts, excluded.attempts), last_error = excluded.last_error,"
                " next_attempt_at = excluded.next_attempt_at, claimed_until = 0,"
                " claim_token = NULL, updated_at = excluded.updated_at"
                " WHERE meter_events.status IN ('queued', 'failed')",
                rows,
            )

    def claim(
        self,
        limit: int,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int | None = None,
        tenant_id: str | None = None,
        meter_id: str | None = None,
    ) -> list[StoredEvent]:
        now = time.time()
        where = ["status IN ('queued', 'failed')", "next_attempt_at <= ?", "claimed_until <= ?"]
        params: list[object] = [now, now]
        if max_attempts is not None:
            where.append("attempts < ?")
            params.append(max_attempts)
        if tenant_id is not None:
            where.append("tenant_id = ?")
            params.append(tenant_id)
        if meter_id is not None:
            where.append("meter_id = ?")
            params.append(meter_id)
        topic_where, topic_params = self._topic_filter()
        if topic_where:  # (events kept without a topic: by a version before it)
            where.append(topic_where.removeprefix(" AND "))
            params.extend(topic_params)
        token = uuid.uuid4().hex
        with self._transaction(immediate=True) as conn:
            while True:
                rows = conn.execute(
                    "SELECT event_id, payload, status, attempts, last_error, next_attempt_at"
                    f" FROM meter_events WHERE {' AND '.join(where)}"
                    " ORDER BY next_attempt_at LIMIT ?",
                    [*params, limit],
                ).fetchall()
                claimed, unreadable = _rebuild(rows)
                conn.executemany(
                    "UPDATE meter_events SET claimed_until = ?, claim_token = ? WHERE event_id = ?",
                    [(now + lease_seconds, token, s.event.event_id) for s in claimed],
                )
                # A row no event can be rebuilt from (written by hand, or by another tool)
                # is set aside, as discarded with the reason, rather than failing every
                # claim; a claim that found only such rows looks again (an empty answer
                # means nothing is due).
                conn.executemany(
                    f"UPDATE meter_events SET status = '{DISCARDED}', claimed_until = 0,"
                    " last_error = 'unreadable payload', updated_at = ? WHERE event_id = ?",
                    [(now, event_id) for event_id in unreadable],
                )
                if claimed or not unreadable:
                    return claimed

    def mark_delivered(self, event_ids: Sequence[str]) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "DELETE FROM meter_events WHERE event_id = ?", [(i,) for i in event_ids]
            )

    def mark_failed(self, event_ids: Sequence[str], *, error: str, next_attempt_at: float) -> None:
        now = time.time()
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE meter_events SET status = 'failed', attempts = attempts + 1,"
                " last_error = ?, next_attempt_at = ?, claimed_until = 0, claim_token = NULL,"
                " updated_at = ? WHERE event_id = ? AND status IN ('queued', 'failed')",
                # (a row discarded meanwhile, its lease over, stays discarded)
                [(error, next_attempt_at, now, i) for i in event_ids],
            )

    def release(self, event_ids: Sequence[str]) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE meter_events SET claimed_until = 0, claim_token = NULL WHERE event_id = ?",
                [(i,) for i in event_ids],
            )

    def discard(self, event_ids: Sequence[str]) -> None:
        """Give up on events: they stay in the file as ``discarded`` and are never sent."""
        with self._transaction() as conn:
            conn.executemany(
                f"UPDATE meter_events SET status = '{DISCARDED}', claimed_until = 0"
                " WHERE event_id = ?",
                [(i,) for i in event_ids],
            )

    def discard_owed(
        self, *, tenant_id: str, meter_id: str | None = None, dry_run: bool = False
    ) -> int:
        """Give up on the owed events of ``tenant_id`` (and ``meter_id``), of any topic:
        they stay in the file as ``discarded``, keep their last error, and are never sent
        (an operator's choice, for a tenant that will never have a customer account).
        Those a worker holds are left alone (its send settles them). Returns how many;
        ``dry_run`` only counts them."""
        where = " AND tenant_id = ?"
        params: list[object] = [tenant_id]
        if meter_id is not None:
            where += " AND meter_id = ?"
            params.append(meter_id)
        now = time.time()
        owed = "status IN ('queued', 'failed') AND claimed_until <= ?" + where
        with self._transaction(immediate=not dry_run) as conn:
            if dry_run:
                row = conn.execute(f"SELECT count(*) FROM meter_events WHERE {owed}",
                                   [now, *params]).fetchone()  # fmt: skip
                return int(row[0])
            cursor = conn.execute(
                f"UPDATE meter_events SET status = '{DISCARDED}', claim_token = NULL,"
                f" updated_at = ? WHERE {owed}",
                [now, now, *params],
            )
        return cursor.rowcount

    def counts(self) -> dict[str, dict[str, int]]:
        with self._transaction() as conn:
            by_status = dict(
                conn.execute("SELECT status, count(*) FROM meter_events GROUP BY status")
            )
            by_reason = {
                (f"{status}: {error}" if error else status): n
                for status, error, n in conn.execute(
                    "SELECT status, last_error, count(*) FROM meter_events"
                    " GROUP BY status, last_error ORDER BY count(*) DESC"
                )
            }
            owed_by_topic = {
                topic or "": n
                for topic, n in conn.execute(
                    "SELECT topic, count(*) FROM meter_events"
                    " WHERE status IN ('queued', 'failed') GROUP BY topic ORDER BY count(*) DESC"
                )
            }
        # (owed_by_topic: "" for events kept without a topic, which any topic's claims take)
        return {"by_status": by_status, "by_reason": by_reason, "owed_by_topic": owed_by_topic}

    def pending_count(self) -> int:
        """Events still owed (queued or failed)."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT count(*) FROM meter_events WHERE status IN ('queued', 'failed')"
            ).fetchone()
        return int(row[0])

    def not_due(self) -> tuple[int, float | None]:
        """``(count, next_due_at)`` of the owed events of this spool's topic that are not
        due yet (their next attempt is later: a backoff after a failed one), those a
        worker holds left out, as :meth:`make_due` leaves them; ``next_due_at`` in epoch
        seconds, None when there are none."""
        where, params = self._topic_filter()
        with self._transaction() as conn:
            now = time.time()
            count, first = conn.execute(
                "SELECT count(*), min(next_attempt_at) FROM meter_events"
                " WHERE status IN ('queued', 'failed') AND next_attempt_at > ?"
                " AND claimed_until <= ?" + where,
                [now, now, *params],
            ).fetchone()
        return int(count), first

    def leased(self) -> tuple[int, float | None]:
        """``(count, first_lease_end)`` of the owed events of this spool's topic that a
        worker holds (a send under way, or the lease of a process that stopped during
        one): no claim takes them before their lease ends (epoch seconds)."""
        where, params = self._topic_filter()
        with self._transaction() as conn:
            now = time.time()
            count, first = conn.execute(
                "SELECT count(*), min(claimed_until) FROM meter_events"
                " WHERE status IN ('queued', 'failed') AND claimed_until > ?" + where,
                [now, *params],
            ).fetchone()
        return int(count), first

    def make_due(self, *, tenant_id: str | None = None, meter_id: str | None = None) -> int:
        """Make the owed events of this spool's topic that wait for their next attempt
        due now (an operator who knows the backend is back); leased ones are left alone.
        Returns how many."""
        where, params = self._topic_filter()
        if tenant_id is not None:
            where += " AND tenant_id = ?"
            params.append(tenant_id)
        if meter_id is not None:
            where += " AND meter_id = ?"
            params.append(meter_id)
        now = time.time()
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE meter_events SET next_attempt_at = ?, updated_at = ?"
                " WHERE status IN ('queued', 'failed') AND next_attempt_at > ?"
                " AND claimed_until <= ?" + where,
                [now, now, now, now, *params],
            )
        return cursor.rowcount

    def _topic_filter(self) -> tuple[str, list[object]]:
        if self.topic is None:
            return "", []
        return " AND (topic = ? OR topic IS NULL)", [self.topic]

    def close(self) -> None:
        """Close this process's connection (it is opened again on next use)."""
        with self._process_lock():
            self._connection.drop()


def _move_owed(old: sqlite3.Connection, new: sqlite3.Connection, path: str) -> int:
    """Move the owed rows of ``old`` (a removed file) into ``new``; how many. Rows that
    cannot be read from ``old`` are logged as lost; a failure to write ``new`` raises,
    leaving ``old`` as it was."""
    try:
        old.execute("BEGIN IMMEDIATE")
        cursor = old.execute("SELECT * FROM meter_events WHERE status IN ('queued', 'failed')")
        columns = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    except sqlite3.Error as exc:
        _rollback_quietly(old)
        logger.error("spool %r was removed while in use, and the events it held could not be "
                     "read back: %s", path, exc)  # fmt: skip
        return 0
    try:
        if rows:
            new.execute("BEGIN IMMEDIATE")
            try:
                new.executemany(
                    f"INSERT OR IGNORE INTO meter_events ({', '.join(columns)})"
                    f" VALUES ({', '.join('?' * len(columns))})",
                    rows,
                )
            except BaseException:
                _rollback_quietly(new)
                raise
            new.execute("COMMIT")
    except BaseException:
        _rollback_quietly(old)
        raise
    try:
        key = columns.index("event_id")
        old.executemany("DELETE FROM meter_events WHERE event_id = ?", [(r[key],) for r in rows])
        old.execute("COMMIT")
    except sqlite3.Error as exc:  # (in both files now: sent twice at worst, same ids)
        _rollback_quietly(old)
        logger.warning("spool %r: events moved from the removed file stay in it too: %s",
                       path, exc)  # fmt: skip
    return len(rows)


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _file_ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _add_topic_column(conn: sqlite3.Connection) -> None:
    """Give a spool made by a version without topics its ``topic`` column (NULL for the
    events already in it). Two processes may do so at once: the second finds it done."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(meter_events)")}
    if "topic" in columns:
        return
    try:
        conn.execute("ALTER TABLE meter_events ADD COLUMN topic TEXT")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):
            raise


def _refuse_foreign_database(conn: sqlite3.Connection, path: Path) -> None:
    """Raise StoreError when ``path`` is a database of something else (tables, none of
    them ours): a spool path pointed at the app's own database by mistake must not get
    our tables, nor be switched to WAL for good. A new or empty file becomes a spool."""
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if tables and "meter_events" not in tables:
        raise StoreError(
            f"spool {str(path)!r} is an SQLite database of something else (tables "
            f"{', '.join(sorted(tables)[:3])}{', ...' if len(tables) > 3 else ''}; no "
            "meter_events): not written to. Give the spool a file of its own"
        )


def _rebuild(rows: Sequence[Any]) -> tuple[list[StoredEvent], list[str]]:
    """The events of claimed rows, and the ids of the rows whose payload is unreadable
    (each logged)."""
    claimed: list[StoredEvent] = []
    unreadable: list[str] = []
    for event_id, payload, status, attempts, error, due in rows:
        try:
            event = UsageEvent.from_dict(json.loads(payload))
        except (InvalidEvent, KeyError, TypeError, ValueError) as exc:
            # (one line a minute: a spool written by another version may hold many)
            _unreadable_log.log(
                logging.ERROR,
                "spooled meter event %s has an unreadable payload, set aside as discarded: %s",
                event_id,
                exc,
                exc_info=exc,
                key=type(exc).__name__,
            )
            unreadable.append(event_id)
            continue
        claimed.append(StoredEvent(event, status, attempts, error, due))
    return claimed, unreadable


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be written as a SQLite file (with its -wal and -shm files
    beside it), or "" when it can as far as the file system's permissions tell."""
    try:
        if path.exists():
            if path.is_dir():
                return "it is a folder"
            if not os.access(path, os.W_OK):
                return "the file is read-only"
        folder = path.parent
        while not folder.exists():  # made on first use, from the nearest existing folder
            folder = folder.parent
        if not folder.is_dir():
            return f"{str(folder)!r} is not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"the folder {str(folder)!r} is read-only"
    except OSError as exc:
        return str(exc)
    return ""
