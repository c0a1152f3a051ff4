"""DatabaseFailureStore: meter_core's FailureStore protocol on the FailedMeterEvent table.

Guarantees:

- ``store`` inserts with "on conflict do nothing" and updates only rows still owed, so an
  event is never duplicated and a delivered or discarded one is never brought back.
  Called inside the caller's ``transaction.atomic`` block it joins that transaction (the
  transactional outbox of durable mode): a rollback removes the event too.
- ``claim`` runs in its own transaction: it selects due rows with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL, Oracle), then leases them
  with an update that only takes rows still unleased, and returns exactly the rows that
  carry its claim token. Several workers on PostgreSQL never get the same event while a
  lease holds. On SQLite (no row locks) one conditional update selects and leases the
  due rows: it takes the write lock first, so it waits for another writer instead of
  failing, and two workers never both lease a row; run one worker there anyway.
- Every error of a call (a database error, or any other: a value the backend refuses) is
  raised as :class:`meter_core.StoreError`; an error inside the caller's transaction rolls
  back to a savepoint, so that transaction stays usable.
- Connections. On the caller's threads (requests, workers, commands, anything but the
  meter's own sender thread) the store uses the thread's connection as the ORM does and
  never closes it: its lifetime is the caller's (Django's request cycle, or the code that
  runs the thread). On the client's sender thread (named ``meter-sender`` by meter_core)
  the store owns the connection: it keeps it from one poll to the next (an idle process
  holds one connection and opens none per poll, whatever ``CONN_MAX_AGE``), and drops it
  when it is found unusable after a database error or after 5 s without use,
  when it is older than a positive ``CONN_MAX_AGE``, or when the database settings it was
  opened with have changed. :meth:`DatabaseFailureStore.close_connections` closes it when
  the client is closed (:func:`meter_django.reset_client` does).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.conf import settings
from django.db import Error as DBError
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Count, F, Min, Q, QuerySet
from django.db.models.functions import Greatest
from django.utils import timezone

from meter_core import InvalidEvent, LogThrottle, StoredEvent, StoreError, UsageEvent
from meter_django.loop_thread import HANDOFF_WAIT, in_event_loop, run_off_loop
from meter_django.models import (
    DELIVERED,
    DISCARDED,
    FAILED,
    PENDING_STATUSES,
    QUEUED,
    FailedMeterEvent,
)

__all__ = ["DatabaseFailureStore"]

logger = logging.getLogger("meter.django.store")
_unreadable_log = LogThrottle(logger, interval=60.0)

#: The protocol's default lease (meter_core uses the same).
DEFAULT_LEASE_SECONDS = 300.0
MAX_ERROR_LENGTH = 2000


#: The name meter_core gives the client's sender thread (``meter_core.sender``).
SENDER_THREAD_NAME = "meter-sender"
#: ...and its short-lived threads that use the store: the one that offers the events it
#: keeps in memory to the store, and the one that resends the store's given-up events.
#: Their connection is closed after each call (it would be left open when they end).
OFFER_THREAD_NAME = "meter-fallback"
SHORT_LIVED_THREAD_NAMES = frozenset({OFFER_THREAD_NAME, "meter-store-resend"})

# A sender connection idle for longer is checked (one round trip) before its next use.
_IDLE_CHECK_SECONDS = 5.0


def _as_datetime(epoch_seconds: float | None) -> datetime:
    """A time for the table: aware (UTC) with ``USE_TZ``, else naive in the default time
    zone, as Django stores datetimes then."""
    if epoch_seconds is None:
        return timezone.now()
    value = datetime.fromtimestamp(epoch_seconds, tz=dt_timezone.utc)
    if settings.USE_TZ:
        return value
    return timezone.make_naive(value, timezone.get_default_timezone())


def _epoch(value: datetime) -> float:
    """The epoch seconds of a time read from the table (naive: the default time zone)."""
    if timezone.is_naive(value):
        value = timezone.make_aware(value, timezone.get_default_timezone())
    return value.timestamp()


def _on_sender_thread() -> bool:
    return threading.current_thread().name == SENDER_THREAD_NAME


def _settings_key(conn: BaseDatabaseWrapper) -> tuple[Any, ...]:
    """What a connection was opened to (the test runner changes NAME in place)."""
    s = conn.settings_dict
    return (s.get("ENGINE"), s.get("NAME"), s.get("HOST"), s.get("PORT"), s.get("USER"))


def _close_quietly(conn: BaseDatabaseWrapper, *, other_thread: bool = False) -> None:
    """Close ``conn`` (a connection of another thread with ``other_thread``, which must
    not be using it meanwhile). A failure to close leaves nothing to do."""
    if conn.connection is None or conn.in_atomic_block:
        return
    try:
        if other_thread:
            conn.inc_thread_sharing()
        try:
            conn.close()
        finally:
            if other_thread:
                conn.dec_thread_sharing()
    except Exception:
        logger.debug("closing a meter sender's database connection failed", exc_info=True)


class _SenderConnection:
    """The connection of one sender thread, as the store keeps it between calls."""

    __slots__ = ("conn", "key", "lock", "retired", "thread", "used_at")

    def __init__(self, thread: threading.Thread, conn: BaseDatabaseWrapper) -> None:
        self.thread = thread
        self.conn = conn
        self.key: tuple[Any, ...] | None = None  # the settings it was opened with
        self.lock = threading.Lock()  # held by the thread during a call, and to close it
        self.retired = False  # its client is closed: close it after every call
        self.used_at = time.monotonic()  # end of its last call

    def recycle(self) -> None:
        """Before a call: drop the connection when it must not be used again."""
        conn = self.conn
        if conn.connection is None:
            self.key = None
            return
        max_age = conn.settings_dict.get("CONN_MAX_AGE")
        if (
            (self.key is not None and self.key != _settings_key(conn))
            or (max_age and conn.close_at is not None and time.monotonic() >= conn.close_at)
            or conn.get_autocommit() != conn.settings_dict.get("AUTOCOMMIT", True)
            or (
                # An idle connection may have been cut meanwhile (a database restart, a
                # proxy's or firewall's idle timeout): checked before it is trusted with
                # a write that would otherwise fail (events kept only in memory then).
                (conn.errors_occurred or time.monotonic() - self.used_at > _IDLE_CHECK_SECONDS)
                and not conn.is_usable()
            )
        ):
            _close_quietly(conn)
            self.key = None
        else:
            conn.errors_occurred = False

    def settle(self, failed: bool) -> None:
        """After a call: close the connection once retired, or when a database error left
        it unusable; else remember what it was opened to."""
        conn = self.conn
        if self.retired or (
            failed and conn.connection is not None and conn.errors_occurred and not conn.is_usable()
        ):
            _close_quietly(conn)
        if conn.connection is None:
            self.key = None
        elif self.key is None:
            self.key = _settings_key(conn)
        self.used_at = time.monotonic()


def _unleased(now: datetime) -> Q:
    return Q(leased_until__isnull=True) | Q(leased_until__lte=now)


_CLAIMED_FIELDS = ("id", "payload", "status", "attempts", "last_error", "next_attempt_at")


class DatabaseFailureStore:
    """A :class:`meter_core.FailureStore` on the ``FailedMeterEvent`` model.

    ``using`` is the database alias. ``event_ids`` restricts every claim to those events
    and ``ignore_schedule`` makes them due now (the admin's "retry now"); see :meth:`only`.
    Thread-safe: each call uses the calling thread's Django connection.
    """

    def __init__(
        self,
        using: str = "default",
        *,
        event_ids: Sequence[str] | None = None,
        ignore_schedule: bool = False,
    ) -> None:
        self.using = using
        self._event_ids = None if event_ids is None else [str(i) for i in event_ids]
        self._ignore_schedule = ignore_schedule
        # a restricted view hands each event out once: a failed resend must not be
        # claimed again at once by the same run (its schedule is ignored)
        self._handed_out: set[str] = set()
        self._handed_lock = threading.Lock()
        # the connections of the sender threads that call this store (see _unit)
        self._senders: dict[threading.Thread, _SenderConnection] = {}
        self._senders_lock = threading.Lock()
        self._senders_pid = os.getpid()

    def __repr__(self) -> str:
        return f"DatabaseFailureStore(using={self.using!r})"

    def only(self, event_ids: Sequence[str]) -> DatabaseFailureStore:
        """A view of this store whose claims return only ``event_ids``, due or not (leased
        events stay with their worker), each at most once. For resending chosen events
        now."""
        return DatabaseFailureStore(self.using, event_ids=event_ids, ignore_schedule=True)

    # -- plumbing ----------------------------------------------------------------------

    def _objects(self) -> QuerySet[FailedMeterEvent]:
        objects: QuerySet[FailedMeterEvent] = FailedMeterEvent.objects.using(self.using)
        return objects

    @contextmanager
    def _unit(self) -> Iterator[None]:
        """One call: its own transaction (a savepoint inside the caller's), every error as
        StoreError. The connection of a caller's thread is left as it is; that of a sender
        thread is the store's to keep or drop (see the module docstring)."""
        conn = connections[self.using]
        held = None
        if not conn.in_atomic_block and _on_sender_thread():
            held = self._sender_connection(conn)
            held.lock.acquire()
        short_lived = threading.current_thread().name in SHORT_LIVED_THREAD_NAMES
        failed = False
        try:
            if held is not None:
                held.recycle()
            with transaction.atomic(using=self.using):
                yield
        except DBError as exc:  # InterfaceError too ("connection already closed")
            failed = True
            raise StoreError(
                f"meter event table ({self.using}): {exc}{_missing_table_hint(exc, self.using)}"
            ) from exc
        except StoreError:
            raise
        except Exception as exc:  # a value the backend refuses, a bug of a backend
            raise StoreError(
                f"meter event table ({self.using}): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if held is not None:
                try:
                    held.settle(failed)
                finally:
                    held.lock.release()
            elif short_lived and not conn.in_atomic_block:
                _close_quietly(conn)

    def _sender_connection(self, conn: BaseDatabaseWrapper) -> _SenderConnection:
        """The entry of the current (sender) thread, made on its first call."""
        thread = threading.current_thread()
        dead: list[_SenderConnection] = []
        with self._senders_lock:
            if self._senders_pid != os.getpid():
                # a forked child: the parent's connections are not ours to close
                self._senders, self._senders_pid = {}, os.getpid()
            held = self._senders.get(thread)
            if held is None:
                for other in list(self._senders):
                    if not other.is_alive():
                        dead.append(self._senders.pop(other))
                held = self._senders[thread] = _SenderConnection(thread, conn)
        for entry in dead:  # a sender thread that ended without its client being closed
            _close_quietly(entry.conn, other_thread=True)
        if held.conn is not conn:  # the thread's connection was replaced meanwhile
            _close_quietly(held.conn)
            held.conn, held.key = conn, None
        return held

    def close_connections(self, timeout: float = 2.0) -> None:
        """Close the connections this store keeps on sender threads: call it once the
        client using this store is closed (:func:`meter_django.reset_client` does). A
        sender thread still inside a call (a slow database) closes its own when the call
        ends, waited for up to ``timeout`` seconds; one still running later (a send that
        outlived ``close()``) closes its connection after each call."""
        with self._senders_lock:
            if self._senders_pid != os.getpid():
                return
            entries = list(self._senders.values())
            for thread in [t for t in self._senders if not t.is_alive()]:
                del self._senders[thread]
        current = threading.current_thread()
        for held in entries:
            held.retired = True
            if held.thread is current:  # (closed from a hook of the sender thread)
                _close_quietly(held.conn)
            elif held.lock.acquire(timeout=timeout):
                try:
                    _close_quietly(held.conn, other_thread=True)
                finally:
                    held.lock.release()

    # -- the protocol ------------------------------------------------------------------

    def store(
        self,
        events: Sequence[UsageEvent],
        *,
        error: str = "",
        attempts: int = 0,
        next_attempt_at: float | None = None,
    ) -> None:
        """Insert new events (``queued``, or ``failed`` when ``error`` is set). For events
        already here and still owed, a failure updates status, reason, attempts (never
        lowered) and due time and drops any lease; a plain re-store leaves them alone."""
        if not events:
            return
        if in_event_loop():
            # Sync record_usage() (or close()) called from async code, whose event goes to
            # the store (a full queue, a closed client): Django refuses the database on
            # this thread. Written on another, waited for briefly (see run_off_loop).
            def write() -> None:
                self.store(events, error=error, attempts=attempts, next_attempt_at=next_attempt_at)

            if not run_off_loop(write, self.using, what=f"{len(events)} usage events"):
                raise StoreError(
                    f"meter event table ({self.using}): not written within "
                    f"{HANDOFF_WAIT:g}s from an event loop's thread (the write goes on in the "
                    "background; a failure of it is logged)"
                )
            return
        status = FAILED if error else QUEUED
        error = error[:MAX_ERROR_LENGTH]
        with self._unit():
            due = _as_datetime(next_attempt_at)
            rows = [
                FailedMeterEvent(
                    event_id=event.event_id,
                    payload=event.to_dict(),
                    tenant_id=event.tenant_id,
                    device_id=event.device_id,
                    meter_id=event.meter_id,
                    total_usage=event.total_usage,
                    status=status,
                    attempts=attempts,
                    last_error=error,
                    next_attempt_at=due,
                )
                for event in events
            ]
            self._objects().bulk_create(rows, ignore_conflicts=True)
            if error:
                self._objects().filter(
                    event_id__in=[e.event_id for e in events], status__in=PENDING_STATUSES
                ).update(
                    status=FAILED,
                    attempts=Greatest(F("attempts"), attempts),
                    last_error=error,
                    next_attempt_at=due,
                    leased_until=None,
                    claim_token="",
                    updated_at=timezone.now(),
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
        """Lease up to ``limit`` due events, oldest due first (see the module docstring
        for the concurrency guarantees)."""
        if limit <= 0:
            return []
        now = timezone.now()
        query = self._objects().filter(_unleased(now), status__in=PENDING_STATUSES)
        if self._event_ids is not None:
            with self._handed_lock:
                wanted = [i for i in self._event_ids if i not in self._handed_out]
            if not wanted:
                return []
            query = query.filter(event_id__in=wanted)
        if not self._ignore_schedule:
            query = query.filter(next_attempt_at__lte=now)
        if max_attempts is not None:
            query = query.filter(attempts__lt=max_attempts)
        if tenant_id is not None:
            query = query.filter(tenant_id=tenant_id)
        if meter_id is not None:
            query = query.filter(meter_id=meter_id)
        token = uuid.uuid4().hex
        lease = {
            "leased_until": now + timedelta(seconds=lease_seconds),
            "claim_token": token,
            "updated_at": now,
        }
        due = query.order_by("next_attempt_at", "id")
        with self._unit():
            if connections[self.using].vendor == "sqlite":
                # No row locks, and a transaction that reads before it writes cannot take
                # the write lock while another connection writes ("database is locked" at
                # once, e.g. a request writing its event in durable mode). One UPDATE
                # takes the write lock first, waiting for the writer as the database's
                # timeout allows, and leases the due rows it selects.
                self._objects().filter(_unleased(now), id__in=due.values("id")[:limit]).update(
                    **lease
                )
                leased = self._objects().filter(claim_token=token)
                rows = list(leased.order_by("next_attempt_at", "id").values(*_CLAIMED_FIELDS))
            else:
                selected = list(
                    due.select_for_update(skip_locked=True).values(*_CLAIMED_FIELDS)[:limit]
                )
                if not selected:
                    return []
                ids = [row["id"] for row in selected]
                self._objects().filter(_unleased(now), id__in=ids).update(**lease)
                taken = set(
                    self._objects()
                    .filter(id__in=ids, claim_token=token)
                    .values_list("id", flat=True)
                )
                rows = [r for r in selected if r["id"] in taken]
            if not rows:
                return []
            claimed, unreadable = self._rebuild(rows)
            if unreadable:
                self._objects().filter(id__in=unreadable).update(
                    status=DISCARDED,
                    last_error="unreadable payload",
                    leased_until=None,
                    claim_token="",
                    updated_at=now,
                )
        if self._event_ids is not None:
            with self._handed_lock:
                self._handed_out.update(s.event.event_id for s in claimed)
        return claimed

    @staticmethod
    def _rebuild(rows: list[dict[str, Any]]) -> tuple[list[StoredEvent], list[int]]:
        claimed: list[StoredEvent] = []
        unreadable: list[int] = []
        for row in rows:
            try:
                event = UsageEvent.from_dict(row["payload"])
            except (InvalidEvent, KeyError, TypeError, ValueError) as exc:
                # (one line a minute: rows written by another version may be many)
                _unreadable_log.log(
                    logging.ERROR,
                    "meter event row %s has an unreadable payload, set aside as discarded: %s",
                    row["id"],
                    exc,
                    exc_info=exc,
                    key=type(exc).__name__,
                )
                unreadable.append(row["id"])
                continue
            claimed.append(
                StoredEvent(
                    event,
                    row["status"],
                    row["attempts"],
                    row["last_error"],
                    _epoch(row["next_attempt_at"]),
                )
            )
        return claimed, unreadable

    def mark_delivered(self, event_ids: Sequence[str]) -> None:
        """Mark events delivered (kept as the audit trail; never handed out again)."""
        if not event_ids:
            return
        with self._unit():
            self._objects().filter(event_id__in=list(event_ids)).update(
                status=DELIVERED,
                leased_until=None,
                claim_token="",
                updated_at=timezone.now(),
            )

    def mark_failed(self, event_ids: Sequence[str], *, error: str, next_attempt_at: float) -> None:
        """Count a failed attempt, keep the reason, release the lease, due again at
        ``next_attempt_at``. Delivered or discarded events are left alone."""
        if not event_ids:
            return
        with self._unit():
            self._objects().filter(
                event_id__in=list(event_ids), status__in=PENDING_STATUSES
            ).update(
                status=FAILED,
                attempts=F("attempts") + 1,
                last_error=error[:MAX_ERROR_LENGTH],
                next_attempt_at=_as_datetime(next_attempt_at),
                leased_until=None,
                claim_token="",
                updated_at=timezone.now(),
            )

    def release(self, event_ids: Sequence[str]) -> None:
        """End the lease of events without changing anything else."""
        if not event_ids:
            return
        with self._unit():
            self._objects().filter(event_id__in=list(event_ids)).update(
                leased_until=None, claim_token=""
            )

    def discard(self, event_ids: Sequence[str]) -> int:
        """Give up on events still owed: they stay as ``discarded`` and are never sent.
        Events under a lease (a sender has them on the wire) are left alone: the send
        would mark them delivered anyway. Returns how many were discarded."""
        if not event_ids:
            return 0
        with self._unit():
            n: int = (
                self._objects()
                .filter(event_id__in=list(event_ids), status__in=PENDING_STATUSES)
                .filter(_unleased(timezone.now()))
                .update(
                    status=DISCARDED,
                    leased_until=None,
                    claim_token="",
                    updated_at=timezone.now(),
                )
            )
        return n

    def discard_owed(
        self, *, tenant_id: str, meter_id: str | None = None, dry_run: bool = False
    ) -> int:
        """Give up on the owed events of ``tenant_id`` (and ``meter_id``): they stay as
        ``discarded``, keep their last error, and are never sent (an operator's choice,
        for a tenant that will never have a customer account). Events under a lease are
        left alone (their send settles them). Returns how many; ``dry_run`` only counts."""
        now = timezone.now()
        rows = (
            self._objects()
            .filter(tenant_id=tenant_id, status__in=PENDING_STATUSES)
            .filter(_unleased(now))
        )
        if meter_id is not None:
            rows = rows.filter(meter_id=meter_id)
        with self._unit():
            n: int = (
                rows.count()
                if dry_run
                else rows.update(
                    status=DISCARDED, leased_until=None, claim_token="", updated_at=now
                )
            )
        return n

    def counts(self) -> dict[str, dict[str, int]]:
        """Events by status, and owed events by status and last error."""
        with self._unit():
            by_status = {
                row["status"]: row["n"]
                for row in self._objects().values("status").annotate(n=Count("id")).order_by()
            }
            by_reason: dict[str, int] = {}
            for row in (
                self._objects()
                .filter(status__in=PENDING_STATUSES)
                .values("status", "last_error")
                .annotate(n=Count("id"))
                .order_by("-n")
            ):
                reason = row["status"]
                if row["last_error"]:
                    reason = f"{reason}: {row['last_error']}"
                by_reason[reason] = by_reason.get(reason, 0) + row["n"]
        return {"by_status": by_status, "by_reason": by_reason}

    def not_due(self) -> tuple[int, float | None]:
        """``(count, next_due_at)`` of the owed events that are not due yet (waiting for
        their next attempt; those a worker holds left out, as :meth:`make_due` leaves
        them); ``next_due_at`` in epoch seconds, None when there are none."""
        now = timezone.now()
        with self._unit():
            waiting = (
                self._objects()
                .filter(status__in=PENDING_STATUSES, next_attempt_at__gt=now)
                .filter(_unleased(now))
                .aggregate(n=Count("id"), first=Min("next_attempt_at"))
            )
        first = waiting["first"]
        return waiting["n"], None if first is None else _epoch(first)

    def leased(self) -> tuple[int, float | None]:
        """``(count, first_lease_end)`` of the owed events a worker holds (a send under
        way, or the lease of a process that stopped during one): no claim takes them
        before their lease ends (epoch seconds)."""
        now = timezone.now()
        with self._unit():
            held = (
                self._objects()
                .filter(status__in=PENDING_STATUSES, leased_until__gt=now)
                .aggregate(n=Count("id"), first=Min("leased_until"))
            )
        first = held["first"]
        return held["n"], None if first is None else _epoch(first)

    def make_due(self, *, tenant_id: str | None = None, meter_id: str | None = None) -> int:
        """Make the owed events waiting for their next attempt due now (an operator who
        knows the backend is back); leased ones are left alone. Returns how many."""
        now = timezone.now()
        rows = (
            self._objects()
            .filter(status__in=PENDING_STATUSES, next_attempt_at__gt=now)
            .filter(_unleased(now))
        )
        if tenant_id is not None:
            rows = rows.filter(tenant_id=tenant_id)
        if meter_id is not None:
            rows = rows.filter(meter_id=meter_id)
        with self._unit():
            made_due: int = rows.update(next_attempt_at=now, updated_at=now)
        return made_due

    def pending_by_meter(self) -> dict[str, int]:
        """Owed events per meter id."""
        with self._unit():
            return {
                row["meter_id"]: row["n"]
                for row in self._objects()
                .filter(status__in=PENDING_STATUSES)
                .values("meter_id")
                .annotate(n=Count("id"))
                .order_by("-n")
            }


# What SQLite, PostgreSQL and MySQL / MariaDB say of a table that was never created.
_MISSING_TABLE = ("no such table", "does not exist", "doesn't exist")


def _missing_table_hint(exc: BaseException, using: str) -> str:
    """A hint for an error about a missing meter table: its migration was not applied
    (on the database the table lives in)."""
    text = str(exc).lower()
    if "meter_django" in text and any(words in text for words in _MISSING_TABLE):
        database = "" if using == "default" else f" --database {using}"
        return f" (the table is not created yet: run manage.py migrate meter_django{database})"
    return ""
