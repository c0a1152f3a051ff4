"""``manage.py meter_status``: what the FailedMeterEvent table holds (by status, meter and
reason; how many are due now and how old the oldest owed event is) and how the client is
configured. Delivery counters live in each web process (``get_client().stats()``, or
the Prometheus collector), not in this command's process, so they are not shown here."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import Error as DBError
from django.db.models import Min
from django.utils import timezone

from meter_core import ConfigurationError, StoreError, group_reasons
from meter_django.client import get_client
from meter_django.conf import conf
from meter_django.models import PENDING_STATUSES, FailedMeterEvent
from meter_django.store import DatabaseFailureStore


class Command(BaseCommand):
    help = "Show stored usage events by status, meter and error, and the client's settings."
    # The meter table is read (and the client shown, or why it cannot be built): a cron
    # job without the client's METER_* variables (E004, E011) must not be stopped by
    # the system checks.
    requires_system_checks: list[str] = []

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            store = DatabaseFailureStore(conf.database)
            counts = store.counts()
            by_meter = store.pending_by_meter()
            owed = FailedMeterEvent.objects.using(conf.database).filter(status__in=PENDING_STATUSES)
            now = timezone.now()
            due = owed.filter(next_attempt_at__lte=now)
            leased = due.filter(leased_until__gt=now).count()  # being sent by a worker now
            due_count = due.count()
            oldest = owed.aggregate(oldest=Min("created_at"))["oldest"]
        except (ConfigurationError, StoreError) as exc:
            raise CommandError(str(exc)) from exc
        except DBError as exc:
            raise CommandError(f"database error: {exc}") from exc
        out = self.stdout
        out.write("Stored events by status:")
        for status in ("queued", "failed", "delivered", "discarded"):
            out.write(f"  {status:<10} {counts['by_status'].get(status, 0)}")
        out.write("Owed events by meter:")
        for meter_id, n in by_meter.items():
            out.write(f"  {meter_id:<32} {n}")
        if not by_meter:
            out.write("  (none)")
        out.write(f"Due for retry now: {due_count - leased}")
        if leased:
            out.write(f"Being sent (leased by a worker): {leased}")
        if oldest is not None:
            age = (now - oldest).total_seconds()
            out.write(f"Oldest owed event: {age:.0f}s old (created {oldest:%Y-%m-%d %H:%M:%S} UTC)")
        out.write("Owed events by reason:")
        for reason, (n, tenants) in group_reasons(counts["by_reason"]).items():
            out.write(f"  {n:>8} x {reason}{f'  ({tenants} tenants)' if tenants > 1 else ''}")
        if not counts["by_reason"]:
            out.write("  (none)")
        try:
            client = get_client()
        except ConfigurationError as exc:
            out.write(self.style.ERROR(f"Client: misconfigured: {exc}"))
            return
        options = client.options
        out.write(f"Client: {client!r}")
        out.write(f"  enabled {client.enabled}, durable {options['durable']}, "
                  f"failure store {type(client.failure_store).__name__}")  # fmt: skip
        out.write("  (delivery counters are per web process: get_client().stats())")
