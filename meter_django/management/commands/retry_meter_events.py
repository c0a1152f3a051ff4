"""``manage.py retry_meter_events``: resend the usage events stored in the database."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from meter_core import ConfigurationError, RedeliveryReport
from meter_django.retry import retry_events


class Command(BaseCommand):
    help = (
        "Resend due usage events from the FailedMeterEvent table with their original "
        "event ids. Exits non-zero when some stay failed. Safe to run in several copies "
        "at once on PostgreSQL."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--limit", type=int, default=None, help="most events per run")
        parser.add_argument("--batch-size", type=int, default=500, help="events per request")
        parser.add_argument(
            "--max-attempts", type=int, default=None, help="skip events tried this often"
        )
        parser.add_argument("--dry-run", action="store_true", help="count, send nothing")
        parser.add_argument("--tenant", default=None, help="only this tenant's events")
        parser.add_argument("--meter", default=None, help="only this meter's events")
        parser.add_argument("--loop", action="store_true", help="run again every --interval")
        parser.add_argument("--interval", type=float, default=60.0, help="seconds between runs")
        parser.add_argument(
            "--runs", type=int, default=None, help="with --loop: stop after this many runs"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for name in ("limit", "batch_size", "max_attempts", "runs"):
            value = options[name]
            if value is not None and value < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
        runs = 0
        while True:
            report = self._run_once(options)
            runs += 1
            if not options["loop"] or (options["runs"] is not None and runs >= options["runs"]):
                break
            try:
                time.sleep(options["interval"])
            except KeyboardInterrupt:  # Ctrl-C between runs: a normal way to stop the loop
                self.stdout.write("stopped")
                return
        if not report.ok:
            raise CommandError(f"{report.failed} events are still failed")

    def _run_once(self, options: dict[str, Any]) -> RedeliveryReport:
        def progress(report: RedeliveryReport) -> None:
            self.stdout.write(
                f"  claimed {report.claimed}: {report.delivered} delivered, {report.failed} failed"
            )

        try:
            report = retry_events(
                limit=options["limit"],
                batch_size=options["batch_size"],
                max_attempts=options["max_attempts"],
                tenant_id=options["tenant"],
                meter_id=options["meter"],
                dry_run=options["dry_run"],
                progress=progress if options["verbosity"] >= 1 else None,
            )
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        style = self.style.SUCCESS if report.ok else self.style.ERROR
        self.stdout.write(style(report.summary()))
        return report
