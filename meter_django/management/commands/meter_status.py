"""``manage.py meter_status``: what the FailedMeterEvent table holds, and client stats."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from meter_core import ConfigurationError, StoreError
from meter_django.client import get_client
from meter_django.conf import conf
from meter_django.store import DatabaseFailureStore


class Command(BaseCommand):
    help = "Show stored usage events by status, meter and error, and the client's counters."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            store = DatabaseFailureStore(conf.database)
            counts = store.counts()
            by_meter = store.pending_by_meter()
        except (ConfigurationError, StoreError) as exc:
            raise CommandError(str(exc)) from exc
        out = self.stdout
        out.write("Stored events by status:")
        for status in ("queued", "failed", "delivered", "discarded"):
            out.write(f"  {status:<10} {counts['by_status'].get(status, 0)}")
        out.write("Owed events by meter:")
        for meter_id, n in by_meter.items():
            out.write(f"  {meter_id:<32} {n}")
        if not by_meter:
            out.write("  (none)")
        out.write("Owed events by reason:")
        for reason, n in counts["by_reason"].items():
            out.write(f"  {n:>8} x {reason}")
        if not counts["by_reason"]:
            out.write("  (none)")
        try:
            client = get_client()
        except ConfigurationError as exc:
            out.write(self.style.ERROR(f"Client: misconfigured: {exc}"))
            return
        out.write(f"Client: {client!r} (enabled: {client.enabled})")
        for name, value in client.stats().items():
            out.write(f"  {name:<18} {value}")
