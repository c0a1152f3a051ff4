"""``manage.py discard_meter_events``: give up on a tenant's owed usage events.

Events the backend refused for good (no customer account for the tenant) stay owed, and
``retry_meter_events`` tries them again after each backoff, in case the account is made.
For a tenant that will never have one (a test tenant, a customer gone), an operator gives
up on its events here::

    python manage.py discard_meter_events --tenant acme-test          # asks first
    python manage.py discard_meter_events --tenant acme-test --dry-run

They stay in the table as ``discarded``, with their last error, and are never sent nor
billed (``purge_meter_events --discarded`` deletes them later). Events a sender has on the
wire are left alone. The admin's "discard" action does the same for chosen rows.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import Error as DBError
from django.utils.translation import ngettext

from meter_core import ConfigurationError, StoreError
from meter_django.conf import conf
from meter_django.store import DatabaseFailureStore


def _owed(count: int) -> str:
    return ngettext("%(count)d owed event", "%(count)d owed events", count) % {"count": count}


class Command(BaseCommand):
    help = (
        "Give up on the owed usage events of a tenant (one that will never have a customer "
        "account): they stay as discarded and are never sent nor billed."
    )
    # Only the meter table is read or written: a cron job without the client's
    # METER_* variables (E004, E011) must not be stopped by the system checks.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="the tenant whose events go")
        parser.add_argument("--meter", default=None, help="only this meter's events")
        parser.add_argument("--dry-run", action="store_true", help="count, discard nothing")
        parser.add_argument(
            "--noinput", "--no-input", action="store_false", dest="interactive",
            help="do not ask for confirmation",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        tenant, meter = options["tenant"], options["meter"]
        which = f"tenant {tenant!r}" + (f", meter {meter!r}" if meter else "")
        try:
            store = DatabaseFailureStore(conf.database)
            owed = store.discard_owed(tenant_id=tenant, meter_id=meter, dry_run=True)
            if not owed:
                self.stdout.write(f"no owed event of {which} (those being sent are left alone)")
                return
            if options["dry_run"]:
                self.stdout.write(f"would discard {_owed(owed)} of {which}")
                return
            if options["interactive"]:
                try:
                    answer = input(
                        f"Discard {_owed(owed)} of {which}? They will never be sent nor "
                        "billed. Type 'yes' to continue: "
                    )
                except EOFError:  # (no terminal: cron, a pipe)
                    raise CommandError(
                        "discarding asks for confirmation: pass --noinput to run it "
                        "without a terminal"
                    ) from None
                if answer.strip().lower() != "yes":
                    self.stdout.write("nothing discarded")
                    return
            done = store.discard_owed(tenant_id=tenant, meter_id=meter)
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        except (StoreError, DBError) as exc:
            raise CommandError(f"database error: {exc}") from exc
        self.stdout.write(
            self.style.SUCCESS(f"discarded {_owed(done)} of {which}: never to be sent")
        )
