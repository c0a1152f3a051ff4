"""``manage.py purge_meter_events``: delete the rows of events delivered long ago.

The FailedMeterEvent table keeps a delivered event's row (the audit trail of what was
sent late, and in durable mode of every event: a row per event, some 8 million a day at
100 requests a second). Run this from cron, daily::

    python manage.py purge_meter_events --older-than 7     # days; --dry-run counts only

Only delivered rows (with ``--discarded``, also the rows an operator discarded) whose
last change is older than that go; rows still owed to the backend are never deleted.
They are deleted in chunks, each in its own transaction, so that the table is never
locked for long.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import Error as DBError
from django.db import transaction
from django.utils import timezone

from meter_core import ConfigurationError
from meter_django.conf import conf
from meter_django.models import DELIVERED, DISCARDED, FailedMeterEvent

CHUNK = 5_000


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise CommandError(f"--older-than: a number of days, got {text!r}") from None
    if not 0 <= days <= 36_500:  # (also refuses nan)
        raise CommandError(f"--older-than: a number of days from 0 to 36500, got {text!r}")
    return days


class Command(BaseCommand):
    help = "Delete the rows of usage events delivered (or discarded) more than N days ago."
    # Only the meter table is read or written: a cron job without the client's
    # METER_* variables (E004, E011) must not be stopped by the system checks.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than", default="7", metavar="DAYS",
            help="days since the row last changed (default 7)",
        )  # fmt: skip
        parser.add_argument(
            "--discarded", action="store_true", help="also the rows an operator discarded"
        )
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        days = _days(options["older_than"])
        statuses = [DELIVERED, DISCARDED] if options["discarded"] else [DELIVERED]
        try:
            using = conf.database
            rows = FailedMeterEvent.objects.using(using).filter(
                status__in=statuses, updated_at__lt=timezone.now() - timedelta(days=days)
            )
            if options["dry_run"]:
                self.stdout.write(f"would delete {rows.count()} rows ({', '.join(statuses)})")
                return
            deleted = 0
            while True:
                with transaction.atomic(using=using):
                    chunk = list(rows.values_list("pk", flat=True)[:CHUNK])
                    if not chunk:
                        break
                    deleted += (
                        FailedMeterEvent.objects.using(using)
                        .filter(pk__in=chunk, status__in=statuses)
                        .delete()[0]
                    )
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        except DBError as exc:
            raise CommandError(f"database error: {exc}") from exc
        kinds = ", ".join(statuses)
        self.stdout.write(f"deleted {deleted} rows ({kinds}, older than {days:g} days)")
