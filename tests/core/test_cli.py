"""The ``meter`` command line: devserver, retry, spool, demo."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from meter_core import SQLiteSpool, UsageEvent, group_reasons
from meter_core.cli import main
from meter_core.devserver import DevServer
from tests.core.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]


def fill(spool_path: Path, n: int, tenant: str = "acme") -> list[str]:
    spool = SQLiteSpool(spool_path)
    events = [UsageEvent(tenant, "d", "page.processed.basic", i) for i in range(n)]
    spool.store(events, error="BackendUnavailable: down", attempts=6)
    spool.close()
    return [e.event_id for e in events]


def retry_args(backend_url: str, spool_path: Path, *extra: str) -> list[str]:
    return ["retry", "--spool", str(spool_path), "--kafka-url", backend_url,
            "--internal-url", backend_url, *extra]  # fmt: skip


def test_retry_resends_with_the_same_event_ids(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = fill(tmp_path / "s.db", 30)
    assert main(retry_args(backend.url, tmp_path / "s.db")) == 0
    assert sorted(backend.event_ids()) == sorted(ids)
    out = capsys.readouterr().out
    assert "30 delivered, 0 failed" in out
    assert "0 events still in the spool" in out


def test_retry_resends_only_its_topic_of_a_shared_spool(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.db"
    eu_events = [UsageEvent("eu-tenant", "d", "page.processed.basic", 1) for _ in range(2)]
    SQLiteSpool(path, topic="eu-usage").store(eu_events, error="down", attempts=6)
    SQLiteSpool(path, topic="usage-events").store(
        [UsageEvent("us-tenant", "d", "page.processed.basic", 1)], error="down", attempts=6
    )
    assert main(retry_args(backend.url, path)) == 0  # the default topic, usage-events
    assert [r["value"]["tenant_id"] for r in backend.records] == ["us-tenant"]
    out = capsys.readouterr().out
    assert "2 events still in the spool" in out
    assert "2 of them for topic 'eu-usage', not resent here: run with --topic eu-usage" in out
    eu = DevServer(topic="eu-usage").start()
    try:
        assert main(retry_args(eu.url, path, "--topic", "eu-usage")) == 0
        assert sorted(eu.event_ids()) == sorted(e.event_id for e in eu_events)
    finally:
        eu.stop()


def test_retry_says_what_is_not_due_yet_and_now_resends_it(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Right after an outage, the rows tried during it wait out their backoff (or an
    # hour or a day, after a clock that jumped ahead): a run resent 0 and said nothing.
    path = tmp_path / "s.db"
    events = [UsageEvent("acme", "d", "page.processed.basic", 1) for _ in range(3)]
    SQLiteSpool(path).store(events, error="down", attempts=2, next_attempt_at=time.time() + 3600)
    assert main(retry_args(backend.url, path)) == 0
    out = capsys.readouterr().out
    assert "3 events still in the spool" in out
    assert "3 of them not due yet (the next in 60 min): --now resends them at once" in out
    assert backend.records == []
    assert main(retry_args(backend.url, path, "--now")) == 0
    out = capsys.readouterr().out
    assert "3 events waiting for their next attempt made due now" in out
    assert "0 events still in the spool" in out and "not due yet" not in out
    assert sorted(backend.event_ids()) == sorted(e.event_id for e in events)


def test_retry_exits_non_zero_when_events_stay_failed(
    tmp_path: Path, closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path / "s.db", 3)
    assert main(retry_args(closed_port_url, tmp_path / "s.db", "--timeout", "0.5")) == 1
    out = capsys.readouterr().out
    assert "0 delivered, 3 failed" in out
    assert "connection refused" in out
    assert SQLiteSpool(tmp_path / "s.db").pending_count() == 3


def test_retry_dry_run_sends_nothing(backend: DevServer, tmp_path: Path) -> None:
    fill(tmp_path / "s.db", 5)
    assert main(retry_args(backend.url, tmp_path / "s.db", "--dry-run")) == 0
    assert backend.records == []
    assert len(SQLiteSpool(tmp_path / "s.db").claim(10)) == 5


def test_retry_limit_and_progress(
    backend: DevServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fill(tmp_path / "s.db", 120)
    args = retry_args(backend.url, tmp_path / "s.db", "--limit", "100", "--batch-size", "25")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # (progress: on a terminal only)
    assert main(args) == 0
    assert len(backend.records) == 100
    captured = capsys.readouterr()
    assert "100/120 events" in captured.err
    assert "20 events still in the spool" in captured.out
    assert main([*args, "--dry-run", "--batch-size", "5"]) == 0
    assert "\r20/20 events counted" in capsys.readouterr().err  # (none "delivered")


def test_retry_reads_the_environment(
    backend: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(tmp_path / "s.db", 2)
    monkeypatch.setenv("METER_KAFKA_URL", backend.url)
    monkeypatch.setenv("METER_INTERNAL_URL", backend.url)
    assert main(["retry", "--spool", str(tmp_path / "s.db")]) == 0
    assert len(backend.records) == 2


def test_retry_without_a_backend_url_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path / "s.db", 1)
    monkeypatch.delenv("METER_KAFKA_URL", raising=False)
    assert main(["retry", "--spool", str(tmp_path / "s.db")]) == 2
    assert "kafka_url" in capsys.readouterr().err
    assert SQLiteSpool(tmp_path / "s.db").pending_count() == 1


@pytest.mark.parametrize("transport", ["log", "memory"])
def test_retry_refuses_a_transport_from_the_environment_that_sends_nothing(
    backend: DevServer,
    tmp_path: Path,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = fill(tmp_path / "s.db", 3)
    monkeypatch.setenv("METER_TRANSPORT", transport)
    assert main(retry_args(backend.url, tmp_path / "s.db")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"METER_TRANSPORT={transport}" in err and "METER_TRANSPORT=http" in err
    assert backend.records == []
    left = SQLiteSpool(tmp_path / "s.db").claim(10)
    assert sorted(s.event.event_id for s in left) == sorted(ids)
    assert {s.attempts for s in left} == {6}


def test_retry_refuses_when_metering_is_disabled(
    backend: DevServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(tmp_path / "s.db", 3)
    monkeypatch.setenv("METER_ENABLED", "false")
    assert main(retry_args(backend.url, tmp_path / "s.db")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "METER_ENABLED" in err
    assert backend.records == []
    assert len(SQLiteSpool(tmp_path / "s.db").claim(10)) == 3


def test_retry_of_a_spool_not_made_yet_resends_nothing_and_creates_nothing(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an app whose events never failed has no spool yet: a cron job must not fail for it
    path = tmp_path / "nowhere" / "s.db"
    assert main(retry_args(backend.url, path)) == 0
    assert f"no spool at {path}: nothing to resend" in capsys.readouterr().err
    assert not path.parent.exists()


def test_retry_dry_run_needs_no_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path / "s.db", 4)
    for name in ("METER_KAFKA_URL", "METER_INTERNAL_URL", "METER_PORTAL_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["retry", "--spool", str(tmp_path / "s.db"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would resend 4 events" in out
    assert "4 events still in the spool" in out
    assert len(SQLiteSpool(tmp_path / "s.db").claim(10)) == 4  # every claim given back


def test_spool_shows_counts_by_status_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path / "s.db", 4)
    assert main(["spool", "--spool", str(tmp_path / "s.db")]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "4" in out
    assert "BackendUnavailable: down" in out
    assert main(["spool", "--spool", str(tmp_path / "s.db"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_status"] == {"failed": 4}


def test_spool_groups_the_reasons_that_name_a_tenant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a line per tenant (and another per "(cached)" answer) made 102 lines in a drill
    spool = SQLiteSpool(tmp_path / "s.db")
    for n in range(30):
        tenant = f"t-{n}"
        error = f"no customer account for tenant {tenant!r}" + (" (cached)" if n % 2 else "")
        spool.store([UsageEvent(tenant, "d", "page.processed.basic", 1)], error=error)
        if n < 20:
            spool.store([UsageEvent(tenant, "d", "page.processed.basic", 1)],
                        error=f"customer lookup of {tenant!r} failed: HTTP 503")  # fmt: skip
    spool.store([UsageEvent("acme", "d", "page.processed.basic", 1)], error="down")
    spool.close()
    assert main(["spool", "--spool", str(tmp_path / "s.db")]) == 0
    lines = capsys.readouterr().out.split("by reason:\n")[1].splitlines()
    assert [line.split() for line in lines] == [
        ["30", "failed:", "no", "customer", "account", "for", "tenant", "…", "(30", "tenants)"],
        ["20", "failed:", "customer", "lookup", "of", "…", "failed:", "HTTP", "503", "(20",
         "tenants)"],
        ["1", "failed:", "down"],
    ]  # fmt: skip


def test_group_reasons_counts_tenants_not_texts() -> None:
    grouped = group_reasons({
        "failed: no customer account for tenant 'a' (cached)": 5,
        "failed: no customer account for tenant 'a'": 1,
        "failed: no customer account for tenant \"o'k\"": 2,
        "failed: produce failed: HTTP 503": 40,
    })  # fmt: skip
    assert grouped == {
        "failed: produce failed: HTTP 503": (40, 0),
        "failed: no customer account for tenant …": (8, 2),
    }


def test_group_reasons_groups_lookup_failures_that_quote_the_url_too() -> None:
    # "customer lookup of 't-1' at http://…/tenant/t-1 failed": a line per tenant (300 in
    # a drill), the URL naming the tenant again
    url = "http://portal:8000/v1alpha1/customer-accounts/tenant/"
    grouped = group_reasons({
        f"failed: customer lookup of 't-{n}' at {url}t-{n} failed: connection refused": 2
        for n in range(40)
    } | {f"failed: customer lookup of 'a b' at {url}a%20b timed out after 10s": 1})  # fmt: skip
    assert grouped == {
        f"failed: customer lookup of … at {url}… failed: connection refused": (80, 40),
        f"failed: customer lookup of … at {url}… timed out after 10s": (1, 1),
    }


def test_spool_commands_refuse_a_database_of_something_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    assert main(["spool", "--spool", str(path)]) == 1
    assert main(["retry", "--spool", str(path), "--dry-run"]) == 1
    assert "database of something else" in capsys.readouterr().err
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
    finally:
        conn.close()


def test_spool_of_a_missing_file_fails(tmp_path: Path) -> None:
    assert main(["spool", "--spool", str(tmp_path / "nope.db")]) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_devserver_command_serves_both_protocols(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "meter_core.devserver", "--port", str(port),
         "--no-account", "ghost"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stats", timeout=1) as response:
                    assert response.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "devserver did not start"
                time.sleep(0.1)
        env = {**os.environ, "METER_KAFKA_URL": url, "METER_INTERNAL_URL": url}
        code = (
            "from meter_core import MeterClient\n"
            "c = MeterClient.from_env(device_id='d')\n"
            "c.send(tenant_id='acme', meter_id='page.processed.basic', total_usage=4)\n"
        )
        subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)
        with urllib.request.urlopen(f"{url}/_records", timeout=2) as response:
            records = json.load(response)["records"]
        assert records[0]["value"]["total_usage"] == 4
        # --no-account: that tenant's lookup answers [] (to try how an app copes)
        lookup = f"{url}/v1alpha1/customer-accounts/tenant/"
        with urllib.request.urlopen(f"{lookup}ghost", timeout=2) as response:
            assert json.load(response) == []
        with urllib.request.urlopen(f"{lookup}acme", timeout=2) as response:
            assert json.load(response)["id"] == "cust-acme"
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=10)
    assert f"local metering backend on http://127.0.0.1:{port}" in output
    # the banner's line is a shell command that sets all a client needs, device id included
    (export,) = [line for line in output.splitlines() if line.strip().startswith("export ")]
    assert f"METER_KAFKA_URL=http://127.0.0.1:{port}" in export and "METER_DEVICE_ID=" in export
    assert '"total_usage": 4' in output  # each record is printed as it arrives


def test_devserver_on_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "meter_core", "devserver", "--port", str(port)],
            capture_output=True, text=True, cwd=ROOT, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""  # no banner for a server that never listened
    assert result.stderr.count("\n") == 1
    assert f"port {port}" in result.stderr and "already in use" in result.stderr
    assert "--port" in result.stderr


def test_demo_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "every event arrived exactly once" in out


def test_the_command_is_installed_under_both_names() -> None:
    bin_dir = Path(sys.executable).parent
    for name in ("meter", "litewave-meter"):
        done = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "devserver" in done.stdout, (name, done.stderr)
        assert done.stdout.startswith(f"usage: {name} ")


@pytest.mark.parametrize(
    "option", [["--limit", "0"], ["--limit", "-5"], ["--batch-size", "0"], ["--max-attempts", "-1"]]
)
def test_retry_refuses_counts_below_one(
    option: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (they would resend nothing and exit 0, as if the spool were empty)
    with pytest.raises(SystemExit) as exited:
        main(["retry", "--spool", str(tmp_path / "s.db"), *option])
    assert exited.value.code == 2
    assert f"{option[0]}: must be at least 1" in capsys.readouterr().err


def test_main_run_twice_does_not_log_each_line_twice(tmp_path: Path) -> None:
    import logging

    for _ in range(3):
        main(["spool", "--spool", str(tmp_path / "s.db")])
    ours = [h for h in logging.getLogger("meter").handlers if type(h).__name__ == "_StderrHandler"]
    assert len(ours) == 1


def test_retry_filters_by_tenant_and_meter(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acme = fill(tmp_path / "s.db", 3, tenant="acme")
    globex = fill(tmp_path / "s.db", 2, tenant="globex")
    assert (
        main(retry_args(backend.url, tmp_path / "s.db", "--meter", "report.generated.small")) == 0
    )
    assert backend.event_ids() == []
    assert main(retry_args(backend.url, tmp_path / "s.db", "--tenant", "globex")) == 0
    assert sorted(backend.event_ids()) == sorted(globex)
    assert "3 events still in the spool" in capsys.readouterr().out
    assert main(retry_args(backend.url, tmp_path / "s.db")) == 0
    assert sorted(backend.event_ids()) == sorted(acme + globex)


def test_retry_loop_runs_again_and_waits_for_the_spool_to_exist(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    path = tmp_path / "s.db"
    later: list[str] = []
    # the spool is made while the worker runs (it is made at the first failure)
    timer = threading.Timer(0.3, lambda: later.extend(fill(path, 4)))
    timer.start()
    try:
        args = retry_args(backend.url, path, "--loop", "--interval", "0.2", "--runs", "8")
        assert main(args) == 0
    finally:
        timer.cancel()
    assert sorted(backend.event_ids()) == sorted(later)  # each sent once
    out = capsys.readouterr().out
    assert "4 delivered, 0 failed" in out and out.count("resent") >= 2
    runs = [line for line in out.splitlines() if "resent" in line]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in runs), runs


def test_retry_loop_reports_a_failed_run_and_goes_on(
    tmp_path: Path, closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path / "s.db", 2)
    args = retry_args(closed_port_url, tmp_path / "s.db", "--timeout", "0.5", "--loop",
                      "--interval", "0", "--runs", "2")  # fmt: skip
    assert main(args) == 0  # the last run's status: it found nothing due, and failed nothing
    out = capsys.readouterr().out
    assert out.count("0 delivered, 2 failed") == 1  # the second run: not due yet
    assert SQLiteSpool(tmp_path / "s.db").pending_count() == 2


@pytest.mark.parametrize("interval", ["-1", "nan", "inf", "86401", "soon"])
def test_retry_refuses_an_interval_it_could_not_sleep(
    interval: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["retry", "--spool", str(tmp_path / "s.db"), "--loop", "--interval", interval])
    assert exited.value.code == 2
    assert "--interval: must be" in capsys.readouterr().err


def test_retry_loop_reports_a_run_failed_on_the_spool_and_goes_on(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"not a database, " * 512)
    args = retry_args(backend.url, path, "--loop", "--interval", "0", "--runs", "2")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("run failed: ") == 2 and "next run in 0s" in err


def test_retry_loop_stops_on_sigterm_between_runs(backend: DevServer, tmp_path: Path) -> None:
    ids = fill(tmp_path / "s.db", 3)
    worker = subprocess.Popen(
        [sys.executable, "-m", "meter_core", *retry_args(backend.url, tmp_path / "s.db"),
         "--loop", "--interval", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    first_run = ""
    try:
        assert worker.stdout is not None
        # the first run ends with its report (then the worker sleeps): signalled before
        # that, it is stopped in the middle of the run instead
        for line in worker.stdout:
            first_run += line
            if "events still in the spool" in line:
                break
        worker.terminate()
        out, err = worker.communicate(timeout=10)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert "stopped" in err and "3 delivered, 0 failed" in first_run + out
    assert sorted(backend.event_ids()) == sorted(ids)


def test_retry_loop_gives_the_sigterm_handler_back(backend: DevServer, tmp_path: Path) -> None:
    import signal

    def mine(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        fill(tmp_path / "s.db", 1)
        assert main(retry_args(backend.url, tmp_path / "s.db", "--loop", "--runs", "1")) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_retry_says_what_becomes_of_events_refused_for_good_and_how_to_give_up_on_them(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tenant without a customer account failed every run, with nothing to say why
    # or what to do: a cron job alerted forever.
    path = tmp_path / "my spool.db"
    ids = fill(path, 2, tenant="ghost")
    fill(path, 3, tenant="acme")
    backend.remove_customer("ghost")
    assert main(retry_args(backend.url, path)) == 1
    out = capsys.readouterr().out
    assert "3 delivered, 2 failed" in out
    assert (
        "2 events refused for good stay owed and are tried again at each run after a "
        "backoff (at most 2 min), in case the tenant's customer account is made; to give "
        "up on a tenant's: meter discard --spool '" + str(path) + "' --tenant TENANT"
    ) in out
    assert main(["discard", "--spool", str(path), "--tenant", "ghost", "--dry-run"]) == 0
    assert "would discard 2 owed events of tenant 'ghost'" in capsys.readouterr().out
    assert SQLiteSpool(path).pending_count() == 2
    assert main(["discard", "--spool", str(path), "--tenant", "ghost", "--no-input"]) == 0
    assert "discarded 2 owed events of tenant 'ghost'" in capsys.readouterr().out
    spool = SQLiteSpool(path)
    assert spool.pending_count() == 0
    assert spool.counts()["by_status"] == {"discarded": 2}  # (delivered rows go)
    assert main(retry_args(backend.url, path, "--now")) == 0  # nothing owed: a quiet cron
    assert "refused for good" not in capsys.readouterr().out
    assert not set(ids) & set(backend.event_ids())


def test_retry_of_a_backend_failure_alone_says_nothing_of_refusals(
    tmp_path: Path, closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path / "s.db", 2)
    assert main(retry_args(closed_port_url, tmp_path / "s.db", "--timeout", "0.5")) == 1
    assert "refused for good" not in capsys.readouterr().out


def test_discard_keeps_other_tenants_meters_and_leased_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.db"
    spool = SQLiteSpool(path)
    ghost_pages = [UsageEvent("ghost", "d", "page.processed.basic", 1) for _ in range(3)]
    ghost_report = UsageEvent("ghost", "d", "report.generated.small", 1)
    other = UsageEvent("acme", "d", "page.processed.basic", 1)
    spool.store([*ghost_pages, ghost_report, other], error="no customer account")
    leased = spool.claim(1, tenant_id="ghost", meter_id="page.processed.basic")
    spool.close()
    args = ["discard", "--spool", str(path), "--tenant", "ghost"]
    assert main([*args, "--meter", "page.processed.basic", "--no-input"]) == 0
    assert "discarded 2 owed events of tenant 'ghost', meter 'page.processed.basic'" in (
        capsys.readouterr().out
    )
    left = {s.event.event_id for s in SQLiteSpool(path).claim(10)}
    assert left == {ghost_report.event_id, other.event_id}  # (the leased one is held)
    SQLiteSpool(path).release([leased[0].event.event_id, *left])
    assert main(["discard", "--spool", str(path), "--tenant", "nobody", "--no-input"]) == 0
    assert "no owed event of tenant 'nobody'" in capsys.readouterr().out


def test_discard_asks_first_and_refuses_to_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    fill(path, 2, tenant="ghost")
    args = ["discard", "--spool", str(path), "--tenant", "ghost"]
    assert main(args) == 2  # (pytest's stdin is not a terminal)
    assert "pass --no-input" in capsys.readouterr().err
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert main(args) == 0
    assert "nothing discarded" in capsys.readouterr().out
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert main(args) == 0
    assert SQLiteSpool(path).pending_count() == 0
    assert main(["discard", "--spool", str(tmp_path / "none.db"), "--tenant", "x"]) == 1


def test_retry_writes_no_progress_line_to_a_log_file(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path / "s.db", 60)
    assert main(retry_args(backend.url, tmp_path / "s.db", "--batch-size", "25")) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "60 delivered" in captured.out


def test_spool_piped_to_a_reader_that_stops_is_no_traceback(tmp_path: Path) -> None:
    spool = SQLiteSpool(tmp_path / "s.db")
    for n in range(300):  # (a line per reason: more than a pipe's buffer)
        spool.store([UsageEvent(f"t{n}", "d", "page.processed.basic", 1)], error=f"e{n}" * 100)
    spool.close()
    shown = subprocess.run(
        f"{sys.executable} -m meter_core spool --spool {tmp_path / 's.db'} --json | head -1",
        shell=True, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert shown.stdout.strip() == "{"
    assert "Traceback" not in shown.stderr and "BrokenPipe" not in shown.stderr, shown.stderr


def test_retry_says_what_a_worker_holds(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A process stopped during a send (an exit in an outage): its events wait out their
    # lease, and a run said "resent 0 events" with nothing about them.
    path = tmp_path / "s.db"
    fill(path, 3)
    assert len(SQLiteSpool(path).claim(2, lease_seconds=90)) == 2
    assert main(retry_args(backend.url, path)) == 0
    out = capsys.readouterr().out
    assert "resent 1 event: 1 delivered" in out
    assert "2 events still in the spool" in out
    assert re.search(
        r"2 of them are held by a worker \(a send under way, or a process stopped during "
        r"one\): due again when the lease ends, in (89|90)s",
        out,
    ), out


def test_retry_loop_resends_at_once_what_its_failed_runs_pushed_back_once_the_backend_is_back(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each run during an outage put the events 2 minutes out: the spool emptied 2
    # minutes after the backend was back, where the app's sender took 0.5 s.
    path = tmp_path / "s.db"
    pushed = fill(path, 2)
    backend.set_fault("down")
    fresh: list[str] = []

    def recover() -> None:
        def tried_once() -> bool:
            with contextlib.closing(sqlite3.connect(path)) as db:
                return db.execute("SELECT min(attempts) FROM meter_events").fetchone()[0] == 7

        wait_until(tried_once, timeout=10)  # (the first run failed them)
        backend.clear_fault()
        fresh.extend(fill(path, 1))

    helper = threading.Thread(target=recover)
    helper.start()
    code = main(retry_args(backend.url, path, "--loop", "--interval", "1", "--runs", "3"))
    helper.join()
    assert code == 0
    assert sorted(backend.event_ids()) == sorted(pushed + fresh)
    out = capsys.readouterr().out
    assert (
        "the backend takes events again: 2 events waiting for their next attempt made "
        "due now" in out
    )


def test_retry_loop_keeps_the_backoff_of_one_event_failing_among_others(
    backend: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One row failing while the others went made every later run "the backend is back":
    # that row was resent every other run, its backoff lost.
    path = tmp_path / "s.db"
    [bad] = fill(path, 1)
    fill(path, 1)  # (a run that delivers some while one fails is no outage)
    backend.set_fault("record_errors", error_code=50003, event_ids=[bad])

    def more() -> None:
        for _ in range(4):
            time.sleep(0.25)
            fill(path, 1)

    helper = threading.Thread(target=more)
    helper.start()
    main(retry_args(backend.url, path, "--loop", "--interval", "0.3", "--runs", "5"))
    helper.join()
    out = capsys.readouterr().out
    assert "the backend takes events again" not in out
    assert sum(bad in body.decode() for body in backend.raw_bodies) == 1  # (then its backoff)
