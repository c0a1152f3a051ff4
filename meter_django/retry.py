"""Resending stored events: the service behind ``retry_meter_events`` and the admin's
"retry now" action (both thin shells around :func:`retry_events`).

Events are claimed from the FailedMeterEvent table batch by batch and resent with their
original ``event_id`` through :func:`meter_core.redeliver`: delivered ones are marked so,
failed ones get ``attempts + 1`` and a backoff before they are due again. Several
workers may run at once (see :mod:`meter_django.store`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meter_core import ConfigurationError, RedeliveryReport, redeliver
from meter_django.client import get_client
from meter_django.conf import conf
from meter_django.store import DEFAULT_LEASE_SECONDS, DatabaseFailureStore

__all__ = ["retry_events"]


def retry_events(
    *,
    limit: int | None = None,
    batch_size: int = 500,
    max_attempts: int | None = None,
    tenant_id: str | None = None,
    meter_id: str | None = None,
    dry_run: bool = False,
    event_ids: Sequence[str] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    progress: Callable[[RedeliveryReport], None] | None = None,
) -> RedeliveryReport:
    """Resend due events (or exactly ``event_ids``, due or not) from the table.

    Raises ConfigurationError, dry run or not, when the settings cannot build a client,
    when metering is disabled, or when ``TRANSPORT`` names a transport that sends nothing
    (``"log"``, ``"memory"``): through those, events would be marked delivered without
    reaching the backend. A Transport object given in ``TRANSPORT`` is used as it is:
    whoever wires one in code (a test with its own MemoryTransport, say) chose where the
    events go, while a name in the settings is easily left over from development.
    """
    client = get_client()
    if not client.enabled:
        raise ConfigurationError(
            "metering is disabled (METER['ENABLED'] is False): nothing can be resent"
        )
    transport = client.options["transport"]
    if isinstance(transport, str) and transport != "http":
        raise ConfigurationError(
            f"METER['TRANSPORT'] (or METER_TRANSPORT) is {transport!r}, which sends nothing: "
            "resent events would be marked delivered without reaching the backend; set it "
            "to 'http' (with KAFKA_URL) to resend"
        )
    store = DatabaseFailureStore(conf.database)
    if event_ids is not None:
        store = store.only(event_ids)
    return redeliver(
        store,
        client,
        limit=limit,
        batch_size=batch_size,
        max_attempts=max_attempts,
        tenant_id=tenant_id,
        meter_id=meter_id,
        dry_run=dry_run,
        lease_seconds=lease_seconds,
        progress=progress,
    )
