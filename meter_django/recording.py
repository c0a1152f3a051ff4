"""record_usage / record_session: usage from application code, tied to transactions.

- The event is validated at once: bad arguments raise :class:`meter_core.InvalidEvent`.
- Inside ``transaction.atomic`` the event is handed to the client only when the
  transaction commits (``transaction.on_commit``): a rolled-back operation is never billed.
- In durable mode (``METER["DURABLE"]``) the event is written to the FailedMeterEvent
  table as ``queued`` in the caller's transaction (a transactional outbox): it exists
  exactly when the operation's own writes do, and the client's sender delivers it from
  there after the commit. That needs the table on the transaction's database (``using``,
  default ``METER["DATABASE"]``); with another database, or a store outside the database
  (a SQLite spool), the event is written after the commit instead.
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
from collections.abc import Mapping

from django.db import transaction

from meter_core import ConfigurationError, LogThrottle, MeterClient, UsageEvent
from meter_django.client import get_client
from meter_django.conf import conf

__all__ = ["UNCONFIGURED_DEVICE", "record_session", "record_usage", "submit"]

logger = logging.getLogger("meter.django")
_unconfigured = LogThrottle(logger, interval=60.0)
_no_device = LogThrottle(logger, interval=60.0)

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


def _keep_unsent(event: UsageEvent) -> None:
    """The misconfigured case: keep the event for the retry command, or log it lost."""
    try:
        if conf.get("STORE") != "database":
            raise ConfigurationError(f"METER['STORE'] is {conf.get('STORE')!r}")
        from meter_django.store import DatabaseFailureStore

        problem = ", no device id" if event.device_id == UNCONFIGURED_DEVICE else ""
        DatabaseFailureStore(conf.database).store(
            [event], error=f"not sent: metering misconfigured{problem} (see manage.py check)"
        )
    except Exception as exc:
        logger.error(
            "usage event %s (%s x%s for %s) lost: metering is misconfigured and it could "
            "not be kept: %s",
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


def submit(client: MeterClient, event: UsageEvent, *, using: str | None = None) -> None:
    """Hand a built event to ``client`` with the transaction rules of this module.
    In durable mode the store write may raise :class:`meter_core.StoreError`."""
    from meter_django.store import DatabaseFailureStore  # (models: not at import time)

    db = using or conf.database
    store = client.failure_store
    outbox = isinstance(store, DatabaseFailureStore) and store.using == db
    if client.enabled and conf.durable and outbox:
        client.enqueue(event)  # the store write joins the caller's transaction
        if transaction.get_connection(db).in_atomic_block:
            # the sender cannot see the row before the commit: tell it when there is one
            transaction.on_commit(client.wake, using=db)
        return
    # Not the outbox's transaction (another database, or a store outside the database):
    # written after the commit, so rolled-back work is never billed.
    if transaction.get_connection(db).in_atomic_block:
        transaction.on_commit(lambda: _enqueue_after_commit(client, event), using=db)
    else:
        client.enqueue(event)


def _enqueue_after_commit(client: MeterClient, event: UsageEvent) -> None:
    try:
        client.enqueue(event)
    except Exception:
        logger.exception("could not enqueue usage event %s after commit", event.event_id)


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
    ms) to now. ``using`` is the database whose transaction decides (default
    ``METER["DATABASE"]``). Never does network I/O. See the module docstring."""
    builder, client, device_id = _recorder(device_id)
    event = builder.event(
        tenant_id=tenant_id, meter_id=meter_id, total_usage=total_usage,
        device_id=device_id, metadata=metadata, timestamp=timestamp,
    )  # fmt: skip
    if client is None:
        _keep_unsent(event)
    else:
        submit(client, event, using=using)
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
    event = builder.session_event(
        tenant_id=tenant_id, meter_id=meter_id, device_id=device_id,
        start_time=start_time, end_time=end_time, metadata=metadata,
    )  # fmt: skip
    if client is None:
        _keep_unsent(event)
    else:
        submit(client, event, using=using)
    return event.event_id
