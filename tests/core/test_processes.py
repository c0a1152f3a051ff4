"""Processes: a forked child never sends its parent's queue; SIGKILL in durable mode
loses nothing that record() accepted."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from meter_core import MeterClient, SQLiteSpool, UsageEvent, redeliver
from meter_core.devserver import DevServer

RECORD = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 1}
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_forked_child_sends_only_its_own_events(backend: DevServer, make_client: Any) -> None:
    client: MeterClient = make_client(flush_interval=30, batch_size=1000)
    parent_ids = [client.record(**RECORD) for _ in range(10)]
    assert client.stats()["queue_depth"] == 10
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_end)
            assert client.stats()["queue_depth"] == 0
            child_ids = [client.record(**RECORD) for _ in range(5)]
            ok = client.flush(10)
            os.write(write_end, ("\n".join(child_ids)).encode())
            code = 0 if ok else 2
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        child_ids = pipe.read().split("\n")
    assert os.waitstatus_to_exitcode(status) == 0
    assert set(backend.event_ids()) == set(child_ids)
    assert client.flush(10)
    counts = collections.Counter(backend.event_ids())
    assert set(counts) == set(parent_ids) | set(child_ids)
    assert all(n == 1 for n in counts.values())


CHILD = textwrap.dedent(
    """
    import sys, time
    from meter_core import MeterClient, SQLiteSpool
    client = MeterClient(sys.argv[1], internal_url=sys.argv[1], device_id="d",
                         failure_store=SQLiteSpool(sys.argv[2]), durable=True,
                         timeout=0.5, flush_interval=0.01, max_retries=50,
                         backoff_base=0.01, backoff_cap=0.05)
    for _ in range(int(sys.argv[3])):
        print(client.record(tenant_id="acme", meter_id="page.processed.basic",
                            total_usage=1), flush=True)
    print("done", flush=True)
    time.sleep(60)
    """
)


def test_sigkill_in_durable_mode_loses_nothing(
    backend: DevServer, tmp_path: Path, closed_port_url: str, make_client: Any
) -> None:
    spool_path = tmp_path / "durable.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, closed_port_url, str(spool_path), "300"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout is not None
    accepted: list[str] = []
    for line in child.stdout:
        if line.strip() == "done":
            break
        accepted.append(line.strip())
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert len(accepted) == 300
    spool = SQLiteSpool(spool_path)
    client = make_client()
    deadline = time.monotonic() + 15  # a lease held by the killed sender has to expire
    while spool.pending_count() and time.monotonic() < deadline:
        redeliver(spool, client)
        time.sleep(0.2)
    counts = collections.Counter(backend.event_ids())
    assert set(counts) == set(accepted)
    assert all(n == 1 for n in counts.values())
    spool.close()


def test_durable_mode_delivers_from_the_store(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, durable=True)
    ids = [client.record(**RECORD) for _ in range(25)]
    assert spool.pending_count() >= 0
    assert client.flush(10)
    assert spool.pending_count() == 0
    counts = collections.Counter(backend.event_ids())
    assert set(counts) == set(ids)
    assert all(n == 1 for n in counts.values())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_never_generates_the_parents_event_ids() -> None:
    make = lambda: UsageEvent("acme", "web", "page.processed.basic", 1).event_id  # noqa: E731
    make()  # the parent's pool of random bytes is now filled
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        os.write(write_end, "\n".join(make() for _ in range(50)).encode())
        os._exit(0)
    os.close(write_end)
    parent_ids = {make() for _ in range(50)}
    with os.fdopen(read_end) as pipe:
        child_ids = set(pipe.read().split("\n"))
    os.waitpid(pid, 0)
    assert len(child_ids) == 50
    assert not parent_ids & child_ids


_POOL_CLIENT: list[MeterClient] = []  # the client a forked worker process inherits


def _worker_records(n: int, url: str | None) -> None:
    # url given: a client of the worker's own, which nothing refers to once this returns
    client = _POOL_CLIENT[0] if url is None else MeterClient(
        url, internal_url=url, device_id="d", flush_interval=30, batch_size=1000)  # fmt: skip
    for _ in range(n):
        client.record(**RECORD)
    # returns without flush or close: multiprocessing then ends the process with os._exit


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("own_client", [False, True], ids=["inherited", "its-own"])
def test_a_multiprocessing_worker_that_returns_delivers_its_queue(
    backend: DevServer, make_client: Any, own_client: bool
) -> None:
    import multiprocessing

    # flush_interval: nothing would go out before the worker ends on its own
    _POOL_CLIENT[:] = [make_client(flush_interval=30, batch_size=1000)]
    url = backend.url if own_client else None
    worker = multiprocessing.get_context("fork").Process(target=_worker_records, args=(100, url))
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0
    assert len(set(backend.event_ids())) == 100


def _exit_during_a_slow_send(backend: DevServer, spool: Path, durable: bool) -> tuple[str, float]:
    """A process records an event, and exits while its send waits on a backend answering
    in 8 s: the event's id, and how long the exit took."""
    script = textwrap.dedent(f"""
        import sys, time
        from meter_core import MeterClient
        client = MeterClient({backend.url!r}, internal_url={backend.url!r}, device_id="d",
                             spool_path={str(spool)!r}, durable={durable}, timeout=20)
        client.lookup_customer("acme")
        print("ready", flush=True)
        sys.stdin.readline()  # (the backend turns slow)
        print(client.record(tenant_id="acme", meter_id="page.processed.basic",
                            total_usage=1), flush=True)
        time.sleep(0.5)  # the send is on the wire
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=ROOT) as child:  # fmt: skip
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "ready"
            backend.set_fault("slow", delay=8.0)
            child.stdin.write("go\n")
            child.stdin.flush()
            event_id = child.stdout.readline().strip()
            started = time.monotonic()
            assert child.wait(60) == 0
            return event_id, time.monotonic() - started
        finally:
            child.kill()
            backend.clear_fault()


def test_an_exit_with_a_store_does_not_wait_out_a_slow_send(
    backend: DevServer, tmp_path: Path
) -> None:
    # gunicorn starts a worker's replacement once it has exited: workers recycled
    # together while the backend answered in 8 s stopped the service for 5 s (the exit's
    # close() waited for the send on the wire). With a store, the send's events are
    # stored at once (resent later under the same ids) and the exit is quick.
    event_id, took = _exit_during_a_slow_send(backend, tmp_path / "s.db", durable=False)
    assert took < 3.5, took  # (5 s of close() at exit before)
    assert [s.event.event_id for s in SQLiteSpool(tmp_path / "s.db").claim(10)] == [event_id]


def test_rows_on_the_wire_at_exit_are_given_back_not_left_leased(
    backend: DevServer, tmp_path: Path
) -> None:
    # Durable mode, an exit during a slow send: its rows kept their lease (9 timeouts
    # and 5 s, 95 s by default), so no other worker sent them meanwhile.
    event_id, _ = _exit_during_a_slow_send(backend, tmp_path / "s.db", durable=True)
    # another worker takes it at once
    assert [s.event.event_id for s in SQLiteSpool(tmp_path / "s.db").claim(10)] == [event_id]
