"""``manage.py send_test_meter_event``: check the metering configuration end to end.

Sends one event synchronously (customer lookup, then produce) and reports the answer.
Exits non-zero with a clear message when anything fails. The API key is never printed.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from meter_core import (
    ConfigurationError,
    CustomerNotFound,
    DeliveryError,
    DeliveryRejected,
    InvalidEvent,
)
from meter_django.client import get_client


class Command(BaseCommand):
    help = "Send one usage event now (default: 0 units, so nothing is billed) and report."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="tenant id to send for")
        parser.add_argument("--meter", default="page.processed.basic", help="meter id")
        parser.add_argument("--usage", type=int, default=0, help="units (default 0)")
        parser.add_argument("--device", default=None, help="device id (default DEVICE_ID)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            client = get_client()
        except ConfigurationError as exc:
            raise CommandError(f"configuration: {exc}") from exc
        api_key = client.options.get("api_key")
        self.stdout.write(f"Client: {client!r}; API key: {'set' if api_key else 'not set'}")
        if not client.enabled:
            raise CommandError("metering is disabled (METER['ENABLED'] is False)")
        try:
            answer = client.send(
                tenant_id=options["tenant"],
                meter_id=options["meter"],
                total_usage=options["usage"],
                device_id=options["device"],
            )
        except InvalidEvent as exc:
            raise CommandError(f"invalid event: {exc}") from exc
        except CustomerNotFound as exc:
            raise CommandError(
                f"{exc}: try a tenant that has one, or check which lookup API the client "
                "asks (PORTAL_URL with API_KEY, else INTERNAL_URL)"
            ) from exc
        except DeliveryRejected as exc:
            raise CommandError(f"the backend rejected the event: {exc}") from exc
        except DeliveryError as exc:
            raise CommandError(f"the backend is unavailable: {exc}") from exc
        offsets = answer.get("offsets") or [{}]
        self.stdout.write(
            self.style.SUCCESS(
                f"Delivered: partition {offsets[0].get('partition')}, "
                f"offset {offsets[0].get('offset')}"
            )
        )
