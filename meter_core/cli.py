"""The ``meter`` command (also ``python -m meter_core``).

Subcommands:

- ``devserver``: run the local metering backend (customer lookup + REST Proxy v2).
- ``retry``: resend the events of a SQLite spool, with their original event ids (once, or
  ``--loop``: every ``--interval`` seconds, as a long-running worker).
- ``spool``: show a spool's events by status and reason.
- ``discard``: give up on the owed events of a tenant (one that will never have a
  customer account): they stay in the spool as ``discarded`` and are never sent.
- ``demo``: a short end-to-end tour of meter_core against an in-process local backend.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from meter_core.client import MeterClient
from meter_core.config import CLIENT_OPTIONS, options_from_env
from meter_core.errors import ConfigurationError, MeterError, StoreError
from meter_core.reasons import group_reasons
from meter_core.redeliver import RedeliveryReport, describe_leased, describe_not_due, redeliver
from meter_core.spool import SQLiteSpool
from meter_core.wording import counted

__all__ = ["main"]


def _positive(text: str) -> int:
    """An argparse type: an int >= 1 (0 or less would resend nothing, and say so
    only by the count it prints)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _seconds(text: str) -> float:
    """An argparse type: seconds from 0 to a day (nan or inf could not be slept)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 <= number <= 86_400:
        raise argparse.ArgumentTypeError(f"must be from 0 to 86400 seconds, got {text}")
    return number


def _parser() -> argparse.ArgumentParser:
    called = os.path.basename(sys.argv[0]) if sys.argv else ""
    parser = argparse.ArgumentParser(
        prog=called if called in ("meter", "litewave-meter") else "meter",
        description="Resend stored usage events, show a spool or give up on a tenant's "
        "events in it, or run the local backend (also: python -m meter_core).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser(
        "devserver",
        help="run the local metering backend",
        description="Run the local metering backend: the customer lookup API (both modes) "
        "and a Kafka REST Proxy v2 that keeps the records it is sent. Every tenant has an "
        "account (cust-<tenant>) unless --no-account names it.",
        epilog="While it runs, other processes control it over HTTP: GET /_records "
        "(what it was sent), DELETE /_records, GET /_stats, POST /_customers "
        '{"tenant_id": "t", "customer_id": "c"}, POST /_faults {"mode": "down"} (modes: '
        "down, html502, rate_limit, slow, record_errors, unknown_tenant, malformed, "
        "partial_500, reject; see meter_core.devserver), DELETE /_faults.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dev.add_argument("--port", type=int, default=8787, help="port to listen on (default 8787)")
    dev.add_argument("--topic", default="usage-events", help="the topic it accepts")
    dev.add_argument("--quiet", action="store_true", help="do not print each record")
    dev.add_argument(
        "--no-account", action="append", default=[], metavar="TENANT",
        help="a tenant whose lookup answers [] (no customer account); repeatable",
    )  # fmt: skip

    retry = sub.add_parser("retry", help="resend the events stored in a spool")
    retry.add_argument("--spool", required=True, help="path of the SQLite spool")
    retry.add_argument("--limit", type=_positive, default=None, help="resend at most N events")
    retry.add_argument("--batch-size", type=_positive, default=500)
    retry.add_argument(
        "--max-attempts", type=_positive, default=None, help="skip events already tried N times"
    )
    retry.add_argument("--dry-run", action="store_true", help="count, send nothing")
    retry.add_argument(
        "--now",
        action="store_true",
        help="also resend events waiting for their next attempt (a backoff after a failed "
        "one): once the backend is back after an outage (with --loop: at the first run)",
    )
    retry.add_argument("--tenant", default=None, help="only this tenant's events")
    retry.add_argument("--meter", default=None, help="only this meter's events")
    retry.add_argument("--loop", action="store_true", help="run again every --interval")
    retry.add_argument(
        "--interval", type=_seconds, default=60.0, help="seconds between runs (default 60)"
    )
    retry.add_argument(
        "--runs", type=_positive, default=None, help="with --loop: stop after N runs"
    )
    retry.add_argument("--kafka-url", help="REST Proxy URL (default: METER_KAFKA_URL)")
    retry.add_argument("--portal-url", help="portal URL (default: METER_PORTAL_URL)")
    retry.add_argument("--internal-url", help="internal lookup URL (default: METER_INTERNAL_URL)")
    retry.add_argument("--topic", help="topic (default: METER_TOPIC or usage-events)")
    retry.add_argument("--timeout", type=float, help="seconds per request")

    spool = sub.add_parser("spool", help="show a spool's events by status and reason")
    spool.add_argument("--spool", required=True, help="path of the SQLite spool")
    spool.add_argument("--json", action="store_true", help="print JSON")

    discard = sub.add_parser(
        "discard",
        help="give up on a tenant's owed events: never sent, kept as discarded",
        description="Give up on the owed events of a tenant (say, one that will never have "
        "a customer account): they stay in the spool as discarded, with their last error, "
        "and are never sent nor billed. Events a worker is sending are left alone. Asks "
        "for confirmation unless --no-input.",
    )
    discard.add_argument("--spool", required=True, help="path of the SQLite spool")
    discard.add_argument("--tenant", required=True, help="the tenant whose events go")
    discard.add_argument("--meter", default=None, help="only this meter's events")
    discard.add_argument("--dry-run", action="store_true", help="count, discard nothing")
    discard.add_argument(
        "--no-input", action="store_true", help="do not ask for confirmation (scripts)"
    )

    sub.add_parser("demo", help="a short tour of meter_core against a local backend")
    return parser  # fmt: skip


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each line, not as it was when the handler
    was made (a caller that runs :func:`main` and then redirects or closes the stream)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:  # (the output piped to a reader that stopped: `| head`)
        # no traceback, nor a second error when Python flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    # An entry point may choose where the library's log lines go; the library never does.
    meter_logger = logging.getLogger("meter")
    if not any(isinstance(h, _StderrHandler) for h in meter_logger.handlers):  # (run again)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        meter_logger.addHandler(handler)
    meter_logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        if args.command == "devserver":
            return _devserver(args)
        if args.command == "retry":
            return _retry(args)
        if args.command == "spool":
            return _spool(args)
        if args.command == "discard":
            return _discard(args)
        if args.command == "demo":
            from meter_core.demo import run_demo

            return int(run_demo(print))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except MeterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


def _devserver(args: argparse.Namespace) -> int:
    from meter_core.devserver import DevServer

    def show(record: dict[str, Any]) -> None:
        print(json.dumps(record.get("value")), flush=True)

    server = DevServer(
        args.host,
        args.port,
        topic=args.topic,
        on_record=None if args.quiet else show,
        unknown_tenants=args.no_account,
    )
    try:
        server.start()  # binds here, so the banner below is only shown once it listens
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"error: port {args.port} on {args.host} is already in use; "
                  "choose another with --port", file=sys.stderr)  # fmt: skip
        else:
            print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"local metering backend on {server.url} (Ctrl-C stops it)")
    print("point a client at it with:")
    print(f"  export METER_KAFKA_URL={server.url} METER_INTERNAL_URL={server.url} "
          "METER_DEVICE_ID=local-dev", flush=True)  # fmt: skip
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


DEFAULT_TOPIC: str = CLIENT_OPTIONS["topic"].default


def _retry(args: argparse.Namespace) -> int:
    if not args.loop and not os.path.exists(args.spool):
        # The spool is made at the first event that fails: none yet is the healthy case,
        # and a cron job must not fail for it. Nothing is created (a mistyped path would
        # otherwise become an empty spool): the note on stderr shows the path.
        print(f"no spool at {args.spool}: nothing to resend", file=sys.stderr)
        return 0
    options = options_from_env(os.environ)
    for flag in ("kafka_url", "portal_url", "internal_url", "topic", "timeout"):
        value = getattr(args, flag)
        if value is not None:
            options[flag] = value
    for hook in ("durable", "spool_path"):
        options.pop(hook, None)
    _check_can_resend(options)
    # A dry run only claims, counts and gives back: it needs no client, so no backend URL.
    client = None if args.dry_run else MeterClient(**options)
    # Only the events of the topic resent to: a spool shared by apps of other topics
    # keeps theirs (and events kept without a topic, by an earlier version, go to any).
    args.topic = options.get("topic") or DEFAULT_TOPIC
    try:
        if not args.loop:
            return 0 if _retry_once(args, client, _open_spool(args)).ok else 1
        return _retry_loop(args, client)
    finally:
        if client is not None:
            client.close()


def _retry_loop(args: argparse.Namespace, client: MeterClient | None) -> int:
    """Run every ``--interval`` seconds (``--runs`` times, or until Ctrl-C or SIGTERM):
    a long-running worker beside the app. A run that fails on the spool (a file locked
    for its whole busy timeout) is reported on one line and the next one comes as usual;
    the client, and its customer lookup cache, is kept from run to run. Exit status: the
    last run's."""
    spool: SQLiteSpool | None = None
    ok = True
    runs = 0
    outage = False  # the last run met a backend failing
    stop_on_sigterm = threading.current_thread() is threading.main_thread()
    if stop_on_sigterm:  # (a container's stop, systemd's): stop as on Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            back = False
            if spool is None and os.path.exists(args.spool):  # (made at the first failure)
                spool = _open_spool(args)
            if spool is not None:
                try:
                    report = _retry_once(args, client, spool)
                    ok = report.ok
                    # The backend is back: what failed runs pushed back goes now, not a
                    # backoff later (the app's sender does the same with its retries).
                    # (a run with deliveries and no failure that may pass: a 429, one
                    # tenant's lookup failing, are no return)
                    back = outage and report.delivered > 0 and not report.outage
                    back = back and not args.dry_run
                    # (an outage: failures that may pass, and nothing delivered; not one
                    # event failing among others)
                    outage = report.outage and not report.delivered
                    if back:
                        made_due = spool.make_due(tenant_id=args.tenant, meter_id=args.meter)
                        back = made_due > 0
                        if back:
                            waiting = counted(made_due, "events")
                            print(f"the backend takes events again: {waiting} waiting for "
                                  "their next attempt made due now", flush=True)  # fmt: skip
                except StoreError as exc:
                    ok = False
                    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} run failed: {exc}; "
                          f"next run in {args.interval:g}s", file=sys.stderr)  # fmt: skip
            runs += 1
            if args.runs is not None and runs >= args.runs:
                return 0 if ok else 1
            if not back:  # (else at once)
                time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal ways to stop the worker
        # events claimed by an interrupted run are due again when their lease ends
        print("stopped", file=sys.stderr)
        return 0
    finally:
        if stop_on_sigterm:  # (None: a handler not set from Python; the default then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if spool is not None:
            spool.close()


def _open_spool(args: argparse.Namespace) -> SQLiteSpool:
    # (not checked for writing when built: that warning speaks of an app's events, and
    # a run on a spool it cannot write says so itself)
    return SQLiteSpool(args.spool, topic=args.topic, check_writable=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _retry_once(
    args: argparse.Namespace, client: MeterClient | None, spool: SQLiteSpool
) -> RedeliveryReport:
    if args.now and not args.dry_run:
        args.now = False  # (one-shot: later runs of --loop keep the backoff)
        made_due = spool.make_due(tenant_id=args.tenant, meter_id=args.meter)
        if made_due:
            waiting = counted(made_due, "events")
            print(f"{waiting} waiting for their next attempt made due now", flush=True)
    total = spool.pending_count()
    # (a progress line rewrites itself with \r: only on a terminal, not in a log file)
    show_progress = total > args.batch_size and not args.loop and sys.stderr.isatty()

    def progress(report: RedeliveryReport) -> None:
        if show_progress and args.dry_run:
            print(f"\r{report.claimed}/{total} events counted", end="", file=sys.stderr,
                  flush=True)  # fmt: skip
        elif show_progress:
            print(f"\r{report.claimed}/{total} events: {report.delivered} delivered, "
                  f"{report.failed} failed", end="", file=sys.stderr, flush=True)  # fmt: skip

    report = redeliver(
        spool,
        client,
        limit=args.limit,
        batch_size=args.batch_size,
        max_attempts=args.max_attempts,
        tenant_id=args.tenant,
        meter_id=args.meter,
        dry_run=args.dry_run,
        progress=progress,
    )
    if show_progress:
        print(file=sys.stderr)
    # (a worker's runs read as a log: each says when it ran)
    stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S')} " if args.loop else ""
    print(f"{stamp}{report.summary()}", flush=True)
    print(f"{counted(spool.pending_count(), 'events')} still in the spool", flush=True)
    others = {t: n for t, n in spool.counts()["owed_by_topic"].items() if t and t != spool.topic}
    for topic, n in others.items():
        print(f"  {n} of them for topic {topic!r}, not resent here: run with --topic {topic}",
              flush=True)  # fmt: skip
    hint = describe_not_due(*spool.not_due())
    if hint and args.dry_run and args.now:
        hint = hint.replace("--now resends them at once", "--now would resend them")
    if hint:
        print(f"  {hint}", flush=True)
    held = describe_leased(*spool.leased())
    if held:
        print(f"  {held}", flush=True)
    refused = report.refused_hint(f"meter discard --spool {shlex.quote(args.spool)}")
    if refused:
        print(f"  {refused}", flush=True)
    return report


def _check_can_resend(options: dict[str, Any]) -> None:
    """Raise ConfigurationError when the environment makes a client that would not send:
    events "resent" through it would be deleted from the spool without reaching the
    backend. Checked for a dry run too, so that it reports what the real run would do."""
    transport = options.get("transport", "http")
    if transport != "http":
        raise ConfigurationError(
            f"METER_TRANSPORT={transport} sends nothing, so resent events would be lost; "
            "unset METER_TRANSPORT or set METER_TRANSPORT=http"
        )
    if not options.get("enabled", True):
        raise ConfigurationError(
            "METER_ENABLED is false: a disabled client sends nothing, so nothing is resent; "
            "unset METER_ENABLED or set METER_ENABLED=true"
        )


def _spool(args: argparse.Namespace) -> int:
    if not os.path.exists(args.spool):
        print(f"no spool at {args.spool}", file=sys.stderr)
        return 1
    counts = SQLiteSpool(args.spool, check_writable=False).counts()
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    print(f"spool {args.spool}")
    if not counts["by_status"]:
        print("  empty: nothing is owed to the backend")
    for status, n in sorted(counts["by_status"].items()):
        print(f"  {status:<10} {n}")
    if counts["by_reason"]:
        print("by reason:")
        for reason, (n, tenants) in group_reasons(counts["by_reason"]).items():
            print(f"  {n:>8}  {reason}{f'  ({tenants} tenants)' if tenants > 1 else ''}")
    if len(counts["owed_by_topic"]) > 1:  # (a spool shared by apps of several topics)
        print("owed, by topic:")
        for topic, n in counts["owed_by_topic"].items():
            print(f"  {n:>8}  {topic or '(none: resent to any topic)'}")
    return 0


def _discard(args: argparse.Namespace) -> int:
    if not os.path.exists(args.spool):
        print(f"no spool at {args.spool}", file=sys.stderr)
        return 1
    which = f"tenant {args.tenant!r}" + (f", meter {args.meter!r}" if args.meter else "")
    spool = SQLiteSpool(args.spool, check_writable=False)
    try:
        owed = spool.discard_owed(tenant_id=args.tenant, meter_id=args.meter, dry_run=True)
        if not owed:
            print(f"no owed event of {which} (those a worker is sending are left alone)")
            return 0
        if args.dry_run:
            print(f"would discard {counted(owed, 'owed events')} of {which}")
            return 0
        if not args.no_input:
            if not sys.stdin.isatty():
                print("error: discarding asks for confirmation; pass --no-input to run "
                      "without a terminal", file=sys.stderr)  # fmt: skip
                return 2
            answer = input(
                f"Discard {counted(owed, 'owed events')} of {which}? They will never be sent nor "
                "billed. Type 'yes' to continue: "
            )
            if answer.strip().lower() != "yes":
                print("nothing discarded")
                return 0
        done = spool.discard_owed(tenant_id=args.tenant, meter_id=args.meter)
    finally:
        spool.close()
    print(f"discarded {counted(done, 'owed events')} of {which}: never to be sent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
