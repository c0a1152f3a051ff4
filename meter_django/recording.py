"""record_usage / record_session: usage from application code, tied to transactions.

- The event is validated at once: bad arguments raise :class:`meter_core.InvalidEvent`.
- Inside ``transaction.atomic`` the event is handed to the client only when the
  transaction commits (``transaction.on_commit``): a rolled-back operation is never billed.
  The transaction that decides: with ``using``, that database's; without it, the meter
  table's database's (``METER["DATABASE"]``) when it has one open, else every database
  this thread has in an atomic block (the event waits for all of them to commit, and a
  rollback of any drops it): work on another database is never billed when it rolls
  back, even with the table elsewhere.
- In durable mode (``METER["DURABLE"]``) the event is written to the FailedMeterEvent
  table as ``queued`` in the caller's transaction (a transactional outbox): it exists
  exactly when the operation's own writes do, and the client's sender delivers it from
  there after the commit. That needs the table on the deciding transaction's database
  (the only one in an atomic block); with another database, several of them, or a store
  outside the database (a SQLite spool), the event is written after the commit instead.
- Async code calls :func:`arecord_usage` / :func:`arecord_session`. In durable mode
  :func:`record_usage` called from a running event loop raises
  ``SynchronousOnlyOperation`` naming them (the outbox write is a database write).
- The return value is the event's ``event_id`` in every case.
- When the settings cannot build a client (``manage.py check`` reports why), the event
  is validated and kept in the FailedMeterEvent table as ``failed`` with the reason, in
  the caller's transaction (``STORE`` "database", the default), so that
  ``retry_meter_events`` delivers it once the settings are fixed; an ERROR is logged (rate
  limited) and the caller's request goes on. Only when that write fails too is the event
  lost, with an ERROR line naming it. The settings that can still be read alone are
  used: ``METER["DEVICE_ID"]`` does not depend on any other option.
- A configuration error never raises here. With no device id given and none configured
  (system check ``meter_django.E011``) the event gets the device id
  :data:`UNCONFIGURED_DEVICE` and, while metering is enabled, is kept as above rather
  than sent; with metering disabled it is captured and discarded as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections, transaction

from meter_core import ConfigurationError, LogThrottle, MeterClient, UsageEvent
from meter_django.client import get_client
from meter_django.conf import conf
from meter_django.loop_thread import in_event_loop, run_off_loop

__all__ = [
    "UNCONFIGURED_DEVICE",
    "arecord_session",
    "arecord_usage",
    "record_session",
    "record_usage",
    "submit",
]

logger = logging.getLogger("meter.django")
_unconfigured = LogThrottle(logger, interval=60.0)
_no_device = LogThrottle(logger, interval=60.0)
_after_commit_failed = LogThrottle(logger, interval=60.0)

#: The device id of events recorded with none given and none configured.
UNCONFIGURED_DEVICE = "unconfigured"


def _client_or_none() -> MeterClient | None:
    try:
        return get_client()
    except ConfigurationError as exc:
        _unconfigured.log(
            logging.ERROR, "metering is misconfigured, usage kept in the database: %s", exc
        )
        return None


def _keep_unsent(event: UsageEvent, using: str | None = None) -> None:
    """The misconfigured case: keep the event for the retry command, or log it lost.
    Written in the caller's transaction when that is the table's database alone, else
    after the deciding transactions commit (as :func:`submit` does)."""
    try:
        if conf.get("STORE") != "database":
            raise ConfigurationError(f"METER['STORE'] is {conf.get('STORE')!r}")
        table_db = conf.database
        deciding = _deciding(using)
        if set(deciding) <= {table_db}:
            _store_unsent(event, table_db)
        else:
            _after_commit(deciding, lambda: _store_unsent(event, table_db, after_commit=True))
    except Exception as exc:
        logger.error(
            "usage event %s (%s x%s for %s) lost: metering is misconfigured and it could "
            "not be kept: %s",
            event.event_id, event.meter_id, event.total_usage, event.tenant_id, exc,
        )  # fmt: skip


def _store_unsent(event: UsageEvent, table_db: str, *, after_commit: bool = False) -> None:
    from meter_django.store import DatabaseFailureStore

    problem = ", no device id" if event.device_id == UNCONFIGURED_DEVICE else ""

    def write() -> None:
        DatabaseFailureStore(table_db).store(
            [event], error=f"not sent: metering misconfigured{problem} (see manage.py check)"
        )

    try:
        if in_event_loop():  # (sync record_usage() from async code)
            if not run_off_loop(write, table_db, what=f"usage event {event.event_id}"):
                logger.warning(
                    "usage event %s is still being kept in the database (a slow write, "
                    "handed off by async code); a failure of it will be logged",
                    event.event_id,
                )
        else:
            write()
    except Exception as exc:
        if not after_commit:
            raise
        logger.error(
            "usage event %s (%s x%s for %s) lost: metering is misconfigured and it could "
            "not be kept after the commit: %s",
            event.event_id, event.meter_id, event.total_usage, event.tenant_id, exc,
        )  # fmt: skip


def _event_builder() -> MeterClient:
    """What builds and validates events when the settings cannot build the real client:
    a client that sends nothing (no I/O, no thread), with the device and meter settings
    that can still be read. Cached until the settings change."""

    def build() -> MeterClient:
        try:
            device = conf.option("device_id")
        except ConfigurationError:
            device = None
        try:
            allow_unknown = conf.allow_unknown_meters
        except ConfigurationError:
            # unreadable: an unknown meter id may be meant, so keep the event, not raise
            allow_unknown = True
        try:
            return MeterClient(
                transport="memory",
                enabled=False,
                device_id=device,
                allow_unknown_meters=allow_unknown,
            )
        except ConfigurationError:  # the device id itself is bad
            return MeterClient(
                transport="memory", enabled=False, allow_unknown_meters=allow_unknown
            )

    return conf.cached("event_builder", build)


def _recorder(device_id: str | None) -> tuple[MeterClient, MeterClient | None, str | None]:
    """What builds the event, the client to hand it to (None: keep it unsent) and the
    device id to build it with. Raises nothing for a configuration error."""
    client = _client_or_none()
    builder = client or _event_builder()
    if device_id is None and builder.device_id is None:
        device_id = UNCONFIGURED_DEVICE
        if client is not None and client.enabled:
            _no_device.log(
                logging.ERROR,
                "no device id configured (METER['DEVICE_ID']), usage kept in the database",
            )
            client = None
    return builder, client, device_id


def _deciding(using: str | None) -> list[str]:
    """The databases whose open transactions decide whether an event recorded now is
    billed: ``using`` when given (if it is in an atomic block); else the meter table's
    database when it is in one (the usual single-database project, ``ATOMIC_REQUESTS``,
    a multi-database ``TestCase``); else every database this thread has in an atomic
    block: the work is in one of them, which one is not known here, and waiting for all
    of them is the rule under which rolled-back work is never billed (a rollback of an
    unrelated transaction drops the event: an under-bill, never a bill for undone
    work). Work on another database than the table's, inside a transaction of both:
    pass ``using``."""
    if using is None:
        table_db = conf.database
        if transaction.get_connection(table_db).in_atomic_block:
            return [table_db]
        return [c.alias for c in connections.all(initialized_only=True) if c.in_atomic_block]
    return [using] if transaction.get_connection(using).in_atomic_block else []


def _after_commit(aliases: list[str], func: Callable[[], None]) -> None:
    """Run ``func`` once every transaction of ``aliases`` (open now) has committed; never
    if one rolls back. No alias: now."""
    if not aliases:
        func()
        return
    if len(aliases) == 1:
        transaction.on_commit(func, using=aliases[0])
        return
    waiting = set(aliases)

    def committed(alias: str) -> None:
        waiting.discard(alias)
        if not waiting:
            func()

    for alias in aliases:
        transaction.on_commit(lambda alias=alias: committed(alias), using=alias)  # type: ignore[misc]


def _refuse_in_event_loop(client: MeterClient | None, name: str) -> None:
    """Durable mode writes the event to the database before returning: Django refuses
    that on an event loop thread. Say so, naming the async variant."""
    if client is None or not client.enabled or not in_event_loop():
        return
    try:
        durable = conf.durable
    except ConfigurationError:
        return
    if durable:
        raise SynchronousOnlyOperation(
            f"{name}() in durable mode (METER['DURABLE']) writes the event to the "
            f"database, which cannot be done from async code: use `await a{name}(...)` "
            f"(meter_django.a{name}) there"
        )


def submit(
    client: MeterClient,
    event: UsageEvent,
    *,
    using: str | None = None,
    hold_on_store_error: bool = False,
) -> None:
    """Hand a built event to ``client`` with the transaction rules of this module.
    In durable mode the store write may raise :class:`meter_core.StoreError`; with
    ``hold_on_store_error`` (a caller that cannot report it: the response is decided)
    the event is then queued in memory and sent as in default mode instead, except for
    a write in the caller's own transaction (the outbox), which still raises."""
    from meter_django.store import DatabaseFailureStore  # (models: not at import time)

    deciding = _deciding(using)
    store = client.failure_store
    if (
        client.enabled
        and conf.durable
        and isinstance(store, DatabaseFailureStore)
        and set(deciding) <= {store.using}
    ):
        # The store write joins the caller's transaction, if any; the sender finds the
        # row at its next poll after the commit (flush_interval), as it finds events in
        # memory (waking it at every commit would send batches of one). An event held in
        # memory there would be sent even if that transaction rolled back.
        _enqueue(client, event, hold_on_store_error=hold_on_store_error and not deciding)
        return
    # Not the outbox's transaction (the table on another database, several databases in
    # a transaction, or a store outside the database): handed over after the commit, so
    # rolled-back work is never billed.
    if deciding:
        _after_commit(deciding, lambda: _enqueue_after_commit(client, event))
    else:
        _enqueue(client, event, hold_on_store_error=hold_on_store_error)


def _enqueue(client: MeterClient, event: UsageEvent, *, hold_on_store_error: bool) -> None:
    if hold_on_store_error:
        client.enqueue_many([event], hold_on_store_error=True)
    else:
        client.enqueue(event)


def _enqueue_after_commit(client: MeterClient, event: UsageEvent) -> None:
    try:
        # Held in memory if the store refuses it (durable mode with the table's database
        # down): the work has committed, and record_usage() has returned, so nobody
        # could be told.
        _enqueue(client, event, hold_on_store_error=True)
    except Exception as exc:  # (a store down fails every event: one line a minute)
        _after_commit_failed.log(
            logging.ERROR,
            "could not enqueue usage event %s after commit: %s: %s",
            event.event_id,
            type(exc).__name__,
            exc,
            exc_info=exc,
            key=type(exc).__name__,
        )


def record_usage(
    *,
    tenant_id: str,
    meter_id: str,
    total_usage: int,
    device_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    timestamp: int | None = None,
    using: str | None = None,
) -> str:
    """Record ``total_usage`` units of ``meter_id`` for ``tenant_id``; returns the
    ``event_id``. ``device_id`` defaults to ``METER["DEVICE_ID"]``, ``timestamp`` (epoch
    ms) to now. ``using`` is the database whose transaction decides (default: the
    table's database when it is in a transaction, else every database that is).
    Never does network I/O. In durable mode, not from async code: see
    :func:`arecord_usage`. See the module docstring."""
    return _record(tenant_id, meter_id, total_usage, device_id, metadata, timestamp, using)


def record_decided_usage(
    *,
    tenant_id: str,
    meter_id: str,
    total_usage: int,
    device_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """:func:`record_usage` for the usage of a response already decided (the middleware,
    ``@meter``), whose caller can neither report nor retry a failed durable write: when
    the failure store refuses the event (a database restarting), it is queued in memory
    and sent as in default mode (a kill of the process meanwhile loses it), as
    meter_asgi does, rather than raised about and lost. Inside a transaction of the
    table's database the write is that transaction's, and a failure still raises.
    Sync code only. Returns the ``event_id``."""
    return _record(tenant_id, meter_id, total_usage, device_id, metadata, None, None,
                   hold_on_store_error=True)  # fmt: skip


def _record(
    tenant_id: str,
    meter_id: str,
    total_usage: int,
    device_id: str | None,
    metadata: Mapping[str, str] | None,
    timestamp: int | None,
    using: str | None,
    *,
    hold_on_store_error: bool = False,
) -> str:
    builder, client, device_id = _recorder(device_id)
    _refuse_in_event_loop(client, "record_usage")
    event = builder.event(
        tenant_id=tenant_id, meter_id=meter_id, total_usage=total_usage,
        device_id=device_id, metadata=metadata, timestamp=timestamp,
    )  # fmt: skip
    if client is None:
        _keep_unsent(event, using)
    else:
        submit(client, event, using=using, hold_on_store_error=hold_on_store_error)
    return event.event_id


def record_session(
    *,
    tenant_id: str,
    meter_id: str,
    device_id: str | None = None,
    start_time: int | None = None,
    end_time: int | None = None,
    metadata: Mapping[str, str] | None = None,
    using: str | None = None,
) -> str:
    """Record an AI session boundary (exactly one of ``start_time`` / ``end_time``, epoch
    ms) with the same guarantees as :func:`record_usage`; returns the ``event_id``."""
    builder, client, device_id = _recorder(device_id)
    _refuse_in_event_loop(client, "record_session")
    event = builder.session_event(
        tenant_id=tenant_id, meter_id=meter_id, device_id=device_id,
        start_time=start_time, end_time=end_time, metadata=metadata,
    )  # fmt: skip
    if client is None:
        _keep_unsent(event, using)
    else:
        submit(client, event, using=using)
    return event.event_id


async def arecord_usage(
    *,
    tenant_id: str,
    meter_id: str,
    total_usage: int,
    device_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    timestamp: int | None = None,
    using: str | None = None,
) -> str:
    """:func:`record_usage` for async code: runs it through ``sync_to_async`` with
    ``thread_sensitive=True``, on the thread (and so the database connection) of the
    request's other sync code. Returns the ``event_id``."""
    return await sync_to_async(record_usage, thread_sensitive=True)(
        tenant_id=tenant_id, meter_id=meter_id, total_usage=total_usage,
        device_id=device_id, metadata=metadata, timestamp=timestamp, using=using,
    )  # fmt: skip


async def arecord_session(
    *,
    tenant_id: str,
    meter_id: str,
    device_id: str | None = None,
    start_time: int | None = None,
    end_time: int | None = None,
    metadata: Mapping[str, str] | None = None,
    using: str | None = None,
) -> str:
    """:func:`record_session` for async code (see :func:`arecord_usage`)."""
    return await sync_to_async(record_session, thread_sensitive=True)(
        tenant_id=tenant_id, meter_id=meter_id, device_id=device_id,
        start_time=start_time, end_time=end_time, metadata=metadata, using=using,
    )  # fmt: skip
