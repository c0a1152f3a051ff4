"""The end-to-end demo (``make demo``): the suite doing its job on one laptop.

It starts meter_core's local backend (the Litewave side), the example Django site and the
example FastAPI app on loopback ports, drives a short workload through both (several
tenants, several meters), takes the backend down while traffic continues, shows the
undelivered events in the Django database and in the FastAPI app's SQLite spool, brings
the backend back, resends them with ``retry_meter_events`` and ``python -m meter_core
retry``, and checks that every event arrived exactly once. Every process it starts, it
stops. What it leaves is in ``example_project/.demo/`` (databases, spool, server logs).

    python example_project/demo.py
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meter_core import SQLiteSpool  # noqa: E402
from meter_core.devserver.remote import RemoteBackend, backend_process, free_port  # noqa: E402

WORK = ROOT / "example_project" / ".demo"
MANAGE = ROOT / "example_project" / "django_site" / "manage.py"
DJANGO_USERS = {"alice": "acme", "bob": "globex", "carol": "initech"}
PASSWORD = "demo-password"
Expected = collections.Counter[tuple[str, str]]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


# -- processes ---------------------------------------------------------------------------


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.RequestException:
        return False
    return True


@contextmanager
def server(
    name: str, argv: list[str], env: dict[str, str], url: str, stop_signal: int
) -> Iterator[str]:
    """Run a server process until the block ends, then stop it with ``stop_signal`` (a
    graceful stop: the app's meter client flushes and closes at exit)."""
    log = (WORK / f"{name}.log").open("w")
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is None and answers(url), f"{name} at {url}")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(stop_signal)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def run(argv: list[str], env: dict[str, str], *, show: bool = True) -> int:
    out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if show:
        for line in (out.stdout + out.stderr).strip().splitlines():
            print(f"   | {line}")
    return out.returncode


# -- workload ----------------------------------------------------------------------------


def django_session(base: str, username: str) -> requests.Session:
    session = requests.Session()
    session.get(f"{base}/accounts/login/", timeout=10).raise_for_status()
    form = {
        "username": username,
        "password": PASSWORD,
        "csrfmiddlewaretoken": session.cookies["csrftoken"],
    }
    response = session.post(f"{base}/accounts/login/", data=form, timeout=10)
    response.raise_for_status()
    session.headers["X-CSRFToken"] = session.cookies["csrftoken"]
    session.headers["Referer"] = base
    return session


def drive_django(base: str, sessions: dict[str, requests.Session], expected: Expected) -> int:
    """Per user: two scans, one report, one search, one template; plus requests that must
    not be billed (a 404 scan, a template whose transaction rolls back)."""
    for username, session in sessions.items():
        tenant = DJANGO_USERS[username]

        def ok(response: requests.Response) -> None:
            assert response.ok, (response.status_code, response.text[:200])

        for doc in (1, 2):
            ok(session.post(f"{base}/documents/{doc}/scan/", timeout=10))
        expected[(tenant, "page.processed.advanced")] += 2
        ok(session.post(f"{base}/reports/export/", timeout=10))
        expected[(tenant, "report.generated.medium")] += 1
        ok(session.get(f"{base}/search/", params={"q": "invoices", "hits": 4}, timeout=10))
        expected[(tenant, "report.generated.dataquery")] += 4
        ok(session.post(f"{base}/templates/", data={"name": "invoice"}, timeout=10))
        expected[(tenant, "template.licensed.total")] += 1
        assert session.post(f"{base}/documents/0/scan/", timeout=10).status_code == 404
        assert session.post(f"{base}/templates/", data={"name": ""}, timeout=10).status_code == 400
    return 5 * len(sessions)  # events: two scans, a report, a search, a template


def drive_fastapi(base: str, tenants: list[str], expected: Expected) -> int:
    """Per tenant: a 3-page scan, a search, a report the handler meters itself, a chat
    session over a websocket; plus a 404 that must not be billed."""
    ws_base = base.replace("http://", "ws://")
    for tenant in tenants:
        gateway = {"X-Litewave-Tenant": tenant}  # what our gateway adds to each request
        response = requests.post(
            f"{base}/documents/7/scan", params={"pages": 3}, headers=gateway, timeout=10
        )
        assert response.ok
        assert "x-meter-pages" not in response.headers  # the usage header stays inside
        expected[(tenant, "page.processed.basic")] += 3
        assert requests.get(f"{base}/search", params={"q": "x"}, headers=gateway, timeout=10).ok
        expected[(tenant, "report.generated.dataquery")] += 1
        assert requests.post(f"{base}/reports/small", headers=gateway, timeout=10).ok
        expected[(tenant, "report.generated.small")] += 1
        with connect(f"{ws_base}/ws/chat", additional_headers=gateway) as chat:
            chat.send("How many pages did we scan?")
            chat.recv(timeout=10)
        expected[(tenant, "chat.on.time_hours")] += 2  # a start and an end event
        assert (
            requests.post(f"{base}/documents/0/scan", headers=gateway, timeout=10).status_code
            == 404
        )
    return 5 * len(tenants)  # events: a scan, a search, a report, a session start and end


# -- what the backend and the stores hold -------------------------------------------------


def received(backend: RemoteBackend) -> Expected:
    """Events per (tenant, meter); session events count one each, others their usage."""
    totals: Expected = collections.Counter()
    for value in backend.values():
        key = (value["tenant_id"], value["meter_id"])
        totals[key] += 1 if "start_time" in value or "end_time" in value else value["total_usage"]
    return totals


def print_table(totals: Expected) -> None:
    print(f"   {'tenant':<9} {'meter':<28} {'usage':>5}")
    for (tenant, meter), usage in sorted(totals.items()):
        print(f"   {tenant:<9} {meter:<28} {usage:>5}")


def pending_in_django(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM meter_django_failedmeterevent WHERE status IN ('queued','failed')"
        ).fetchone()
    return int(count)


def pending_in_spool(path: Path) -> int:
    if not path.exists():
        return 0
    spool = SQLiteSpool(path)
    try:
        return spool.pending_count()
    finally:
        spool.close()


# -- the tour ----------------------------------------------------------------------------


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    db, spool = WORK / "django.sqlite3", WORK / "fastapi-spool.db"
    python = sys.executable
    django_port, fastapi_port, backend_port = free_port(), free_port(), free_port()

    say(f"local Litewave backend on 127.0.0.1:{backend_port}")
    with backend_process(backend_port) as backend:
        env = {
            **os.environ,
            "METER_KAFKA_URL": backend.url,
            "METER_INTERNAL_URL": backend.url,
            "EXAMPLE_DB_PATH": str(db),
            "METER_SPOOL_PATH": str(spool),
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "example_project.django_site.settings",
        }
        for name in ("METER_PORTAL_URL", "METER_API_KEY", "METER_ENABLED", "METER_TRANSPORT"):
            env.pop(name, None)
        expected: Expected = collections.Counter()
        events = 0
        with ExitStack() as apps:
            say("Django site: migrate SQLite, create one user per tenant")
            if run([python, str(MANAGE), "migrate", "--no-input"], env, show=False) != 0:
                run([python, str(MANAGE), "migrate", "--no-input"], env)
                return 1
            run([python, str(MANAGE), "create_demo_users"], env)
            django = f"http://127.0.0.1:{django_port}"
            apps.enter_context(
                server(
                    "django",
                    [python, str(MANAGE), "runserver", "--noreload", f"127.0.0.1:{django_port}"],
                    env,
                    f"{django}/accounts/login/",
                    signal.SIGINT,
                )
            )
            print(f"   serving on {django}")
            say("FastAPI app under uvicorn")
            fastapi = f"http://127.0.0.1:{fastapi_port}"
            apps.enter_context(
                server(
                    "fastapi",
                    [
                        python,
                        "-m",
                        "uvicorn",
                        "example_project.fastapi_app.app:app",
                        "--port",
                        str(fastapi_port),
                        "--log-level",
                        "warning",
                    ],
                    env,
                    f"{fastapi}/openapi.json",
                    signal.SIGTERM,
                )
            )
            print(f"   serving on {fastapi}")
            sessions = {user: django_session(django, user) for user in DJANGO_USERS}
            tenants = sorted(set(DJANGO_USERS.values()))

            say("traffic: 3 tenants through both apps (404s and a rolled-back transaction too)")
            events += drive_django(django, sessions, expected)
            events += drive_fastapi(fastapi, tenants, expected)
            wait_for(lambda: received(backend) == expected, "the events at the backend", 20)
            print("   the backend received, by tenant and meter:")
            print_table(received(backend))

            say("the backend goes down; traffic continues")
            backend.fault("down")
            in_django = drive_django(django, sessions, expected)
            in_fastapi = drive_fastapi(fastapi, tenants, expected)
            events += in_django + in_fastapi
            print("   every request answered as usual; the apps retry, then store the events")
            wait_for(
                lambda: (pending_in_django(db), pending_in_spool(spool)) == (in_django, in_fastapi),
                "the undelivered events in the stores",
                30,
            )
            print(f"   Django database: {in_django} events waiting (manage.py meter_status):")
            run([python, str(MANAGE), "meter_status"], env)
            print(f"   FastAPI spool: {in_fastapi} events waiting (python -m meter_core spool):")
            run([python, "-m", "meter_core", "spool", "--spool", str(spool)], env)

            say("the backend is back: resend what was stored, with the original event ids")
            backend.clear_fault()
            failed = run([python, str(MANAGE), "retry_meter_events"], env)
            failed |= run([python, "-m", "meter_core", "retry", "--spool", str(spool)], env)
            say("stopping both apps (each flushes its client on the way out)")

        say("final check: every event id arrived exactly once")
        ids = collections.Counter(backend.event_ids())
        repeated = sum(1 for count in ids.values() if count > 1)
        left = pending_in_django(db) + pending_in_spool(spool)
        print_table(received(backend))
        ok = (
            not failed
            and len(ids) == events
            and not repeated
            and not left
            and (received(backend) == expected)
        )
        print(
            f"   events sent by the apps: {events}; distinct event ids received: {len(ids)}; "
            f"received more than once: {repeated}; still waiting in a store: {left}"
        )
        print("   OK: nothing lost, nothing billed twice" if ok else "   FAILED: see above")
    print(f"""
== done in {time.monotonic() - started:.0f}s; every process started here is stopped
   look next at: {WORK.relative_to(ROOT)}/ (databases, spool, server logs),
   example_project/django_site (settings.py: METER), example_project/fastapi_app/app.py,
   README.md (quickstarts, settings, guarantees)""")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
