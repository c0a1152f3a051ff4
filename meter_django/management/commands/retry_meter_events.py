"""``manage.py retry_meter_events``: resend the usage events stored in the database.

With ``--loop`` it is a long-running worker: a run that fails on the database (a dropped
connection, a restart or failover, a lock timeout) is reported on one line of stderr (the
traceback too with ``--traceback`` or ``-v 2``) and the next run comes after
``--interval`` as usual; between runs the worker gives back connections that are broken
or older than ``CONN_MAX_AGE``, as Django does between requests. Misconfiguration still
stops it (it would fail the same way every run), and so does Ctrl-C, quietly. A single
run that fails on the database exits non-zero with the reason.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import Error as DBError
from django.db import close_old_connections
from django.utils.translation import ngettext

from meter_core import (
    ConfigurationError,
    RedeliveryReport,
    StoreError,
    describe_leased,
    describe_not_due,
)
from meter_django.conf import conf
from meter_django.retry import retry_events
from meter_django.store import DatabaseFailureStore


def _events(count: int) -> str:
    return ngettext("%(count)d event", "%(count)d events", count) % {"count": count}


def _still_failed(count: int) -> str:
    return ngettext(
        "%(count)d event is still failed", "%(count)d events are still failed", count
    ) % {"count": count}


class Command(BaseCommand):
    help = (
        "Resend due usage events from the FailedMeterEvent table with their original "
        "event ids. Exits non-zero when some stay failed. Safe to run in several copies "
        "at once on PostgreSQL. With --loop, a run that fails on the database is "
        "reported and the worker carries on."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--limit", type=int, default=None, help="most events per run")
        parser.add_argument("--batch-size", type=int, default=500, help="events per request")
        parser.add_argument(
            "--max-attempts", type=int, default=None, help="skip events tried this often"
        )
        parser.add_argument("--dry-run", action="store_true", help="count, send nothing")
        parser.add_argument(
            "--now",
            action="store_true",
            help="also resend events waiting for their next attempt (a backoff after a "
            "failed one): once the backend is back after an outage (with --loop: at the "
            "first run)",
        )
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
        interval = options["interval"]
        if not 0 <= interval <= 86_400:  # also refuses nan; inf would overflow the sleep
            raise CommandError(f"--interval must be from 0 to 86400 seconds, got {interval:g}")
        if not options["loop"]:
            once = self._run_once(options)
            if not once.ok:
                raise CommandError(_still_failed(once.failed))
            return
        runs = 0
        report: RedeliveryReport | None = None
        outage = False  # the last run met a backend failing
        while True:
            back = False
            try:
                # a unit of work, as Django makes of a request: no broken or expired
                # connection is carried into a run, nor kept idle through the sleep
                close_old_connections()
                try:
                    report = self._run_once(options)
                    # The backend is back: what failed runs pushed back goes now, not a
                    # backoff later (the app's sender does the same with its retries).
                    # (a run with deliveries and no failure that may pass: a 429, one
                    # tenant's lookup failing, are no return)
                    back = outage and report.delivered > 0 and not report.outage
                    back = back and not options["dry_run"]
                    # (an outage: failures that may pass, and nothing delivered; not one
                    # event failing among others)
                    outage = report.outage and not report.delivered
                    if back:
                        try:
                            made_due = DatabaseFailureStore(conf.database).make_due(
                                tenant_id=options["tenant"], meter_id=options["meter"]
                            )
                        except StoreError as exc:  # (they are due after their backoff)
                            raise CommandError(f"database error: {exc}") from exc
                        back = made_due > 0
                        if back:
                            self.stdout.write(
                                f"the backend takes events again: {_events(made_due)} waiting "
                                "for their next attempt made due now"
                            )
                except CommandError as exc:
                    if not isinstance(exc.__cause__, (StoreError, DBError)):
                        raise  # misconfiguration: every run would fail alike
                    report = None
                    self._report_run_error(exc, options)
                finally:
                    close_old_connections()
                runs += 1
                if options["runs"] is not None and runs >= options["runs"]:
                    break
                if not back:  # (else at once)
                    time.sleep(options["interval"])
            except KeyboardInterrupt:  # Ctrl-C: a normal way to stop the loop
                # events claimed by an interrupted run are due again when their lease ends
                self.stdout.write("stopped")
                return
        if report is None:
            raise CommandError("the last run failed on the database (see above)")
        if not report.ok:
            raise CommandError(_still_failed(report.failed))

    def _report_run_error(self, exc: CommandError, options: dict[str, Any]) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        # one line: PostgreSQL adds lines that quote the SQL (shown with -v 2)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc.__cause__)
        self.stderr.write(
            f"{when} run failed: {reason}; next run in {options['interval']:g}s",
            style_func=self.style.ERROR,
        )
        if options.get("traceback") or options["verbosity"] >= 2:
            cause = exc.__cause__ or exc
            self.stderr.write("".join(traceback.format_exception(cause)).rstrip())

    def _run_once(self, options: dict[str, Any]) -> RedeliveryReport:
        def progress(report: RedeliveryReport) -> None:
            self.stdout.write(
                f"  claimed {report.claimed}: {report.delivered} delivered, {report.failed} failed"
            )

        try:
            store = DatabaseFailureStore(conf.database)
            if options["now"] and not options["dry_run"]:
                options["now"] = False  # (one-shot: later runs of --loop keep the backoff)
                made_due = store.make_due(tenant_id=options["tenant"], meter_id=options["meter"])
                if made_due:
                    self.stdout.write(
                        _events(made_due) + " waiting for their next attempt made due now"
                    )
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
        except (StoreError, DBError) as exc:
            raise CommandError(f"database error: {exc}") from exc
        style = self.style.SUCCESS if report.ok else self.style.ERROR
        # (a worker's runs read as a log: each says when it ran)
        stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S')} " if options["loop"] else ""
        self.stdout.write(style(f"{stamp}{report.summary()}"))
        try:
            pending = sum(store.pending_by_meter().values())
            hint = describe_not_due(*store.not_due())
            held = describe_leased(*store.leased())
        except (StoreError, DBError) as exc:  # (a run whose database failed, after all)
            raise CommandError(f"database error: {exc}") from exc
        if hint and options["dry_run"] and options["now"]:
            hint = hint.replace("--now resends them at once", "--now would resend them")
        if hint or held:
            self.stdout.write(f"{_events(pending)} still owed")
        for line in (hint, held):
            if line:
                self.stdout.write(f"  {line}")
        refused = report.refused_hint("manage.py discard_meter_events")
        if refused:
            self.stdout.write(f"  {refused}")
        return report
