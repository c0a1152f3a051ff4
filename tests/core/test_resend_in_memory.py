"""Without a failure store, events whose retries ran out in an outage are kept in memory
and resent by the sender once the backend is back: slowly while it is down (one request
at a time, spaced out, honouring Retry-After), never mixed with fresh events, and once
more by close(). Against the real local backend."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from meter_core import MeterClient
from meter_core import sender as sender_module
from meter_core.devserver import DevServer
from tests.core.conftest import wait_until

RECORD = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 1}


@pytest.fixture
def fast_resends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resends 0.3 s after a failure, doubling up to 1.2 s (5 and 60 s in production)."""
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_MAX_SECONDS", 1.2)


def _failed_in_an_outage(
    backend: DevServer,
    make_client: Any,
    events: int,
    mode: str = "down",
    options: dict[str, Any] | None = None,
    **params: Any,
) -> tuple[MeterClient, set[str]]:
    """A client without a store (built with ``options``) whose ``events`` failed for
    good (max_retries=1) while the backend answers produce requests with the fault
    ``mode``."""
    client: MeterClient = make_client(max_retries=1, **(options or {}))
    client.send(**RECORD)  # (the customer is looked up and cached: the fault hits produce)
    backend.reset()
    backend.set_fault(mode, **params)
    ids = {client.record(**RECORD) for _ in range(events)}
    wait_until(lambda: client.stats()["failed_in_memory"] == events)
    return client, ids


@pytest.mark.usefixtures("fast_resends")
def test_events_whose_retries_ran_out_are_resent_once_the_backend_is_back(
    backend: DevServer, make_client: Any
) -> None:
    client, ids = _failed_in_an_outage(backend, make_client, 30)
    assert client.stats()["failed"] == 30 and backend.event_ids() == []
    backend.clear_fault()
    # (the backend has them a moment before the client has read its answer)
    wait_until(lambda: client.stats()["resent"] == 30)
    assert sorted(backend.event_ids()) == sorted(ids)  # each once
    stats = client.stats()
    assert stats["resent"] == 30 and stats["failed"] == 30 and stats["sent"] == 30
    assert stats["recorded"] == stats["sent"] - stats["resent"] + stats["failed"]
    assert stats["dropped"] == stats["stored"] == 0


@pytest.mark.usefixtures("fast_resends")
def test_resends_during_an_outage_are_one_request_at_a_time_and_spaced_out(
    backend: DevServer, make_client: Any
) -> None:
    # 40 events of 4 tenants, in the list as one batch: each resend is one request, the
    # next one 0.3, 0.6, 1.2, 1.2... s later; retried in a loop it would be hundreds.
    client: MeterClient = make_client(max_retries=0)
    for tenant in ("a", "b", "c", "d"):
        client.send(**{**RECORD, "tenant_id": tenant})
    backend.reset()
    backend.set_fault("down")
    for _ in range(10):
        for tenant in ("a", "b", "c", "d"):
            client.record(**{**RECORD, "tenant_id": tenant})
    wait_until(lambda: client.stats()["failed_in_memory"] == 40)
    before = backend.produce_requests
    time.sleep(2.5)
    resends = backend.produce_requests - before
    assert 1 <= resends <= 5, resends
    backend.clear_fault()
    wait_until(lambda: len(backend.event_ids()) == 40)
    # (the backend writes the records before it answers: the client then empties its list)
    wait_until(lambda: client.stats()["failed_in_memory"] == 0)


@pytest.mark.usefixtures("fast_resends")
def test_a_retry_after_holds_resends_back(backend: DevServer, make_client: Any) -> None:
    client, _ = _failed_in_an_outage(backend, make_client, 3, "rate_limit", retry_after=2)
    failed_at = time.monotonic()
    before = backend.produce_requests
    backend.clear_fault()
    time.sleep(1.4)  # past the 0.3 s first wait, within the backend's Retry-After
    assert backend.produce_requests == before
    wait_until(lambda: client.stats()["resent"] == 3)
    assert time.monotonic() - failed_at >= 1.9
    assert len(backend.event_ids()) == 3


@pytest.mark.usefixtures("fast_resends")
def test_events_refused_for_good_are_kept_but_not_resent(
    backend: DevServer, make_client: Any
) -> None:
    client: MeterClient = make_client()
    backend.remove_customer("ghost")  # no customer account: refused, not retried
    event_id = client.record(**{**RECORD, "tenant_id": "ghost"})
    wait_until(lambda: client.stats()["failed_in_memory"] == 1)
    backend.add_customer("ghost", "cust-ghost")
    client.customer_cache.invalidate("ghost")
    time.sleep(1.5)
    assert backend.event_ids() == []
    [kept] = client.failed_events()
    assert kept.event.event_id == event_id and kept.next_attempt_at == math.inf
    assert client.stats()["resent"] == 0


def test_close_makes_a_last_resend_of_the_in_memory_list(
    backend: DevServer, make_client: Any
) -> None:
    # (production timings: the next resend would be 5 s away; close() does not wait)
    client, ids = _failed_in_an_outage(backend, make_client, 5)
    backend.clear_fault()
    started = time.monotonic()
    client.close(timeout=3)
    assert time.monotonic() - started < 2.5
    assert sorted(backend.event_ids()) == sorted(ids)
    assert client.stats()["failed_in_memory"] == 0 and client.stats()["resent"] == 5


def test_close_still_down_returns_within_its_timeout_and_says_what_is_lost(
    backend: DevServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = _failed_in_an_outage(backend, make_client, 4)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="meter"):
        client.close(timeout=1)
    assert time.monotonic() - started < 2.0
    assert client.stats()["failed_in_memory"] == 4
    assert "4 usage events at close" in caplog.text


def test_close_with_no_time_left_makes_no_resend(backend: DevServer, make_client: Any) -> None:
    client, _ = _failed_in_an_outage(backend, make_client, 2)
    backend.clear_fault()
    before = backend.produce_requests
    client.close(timeout=0)
    time.sleep(0.3)
    assert backend.produce_requests == before
    assert client.stats()["failed_in_memory"] == 2


@pytest.mark.usefixtures("fast_resends")
def test_flush_does_not_wait_for_the_in_memory_list(backend: DevServer, make_client: Any) -> None:
    # The backend stays down: flush(None) answers for the queue and the retries, not for
    # events that failed for good (resent in the background).
    client, _ = _failed_in_an_outage(backend, make_client, 3)
    answers: list[bool] = []
    waiter = threading.Thread(target=lambda: answers.append(client.flush(None)), daemon=True)
    waiter.start()
    waiter.join(3)
    assert answers == [True]
    assert client.stats()["failed_in_memory"] == 3


@pytest.mark.usefixtures("fast_resends")
def test_fresh_events_are_not_held_back_by_resends(backend: DevServer, make_client: Any) -> None:
    # Fresh events go out at once, in requests of their own, whatever the list holds.
    client, _ = _failed_in_an_outage(backend, make_client, 3)
    backend.clear_fault()
    fresh = client.record(**{**RECORD, "total_usage": 7})
    assert client.flush(5)
    assert fresh in backend.event_ids()
    wait_until(lambda: client.stats()["failed_in_memory"] == 0)
    assert len(backend.event_ids()) == 4


def test_fresh_events_going_through_bring_the_next_resend_forward(
    backend: DevServer, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After four failed resends the next is 4.8 s away; once fresh events go through
    # again, the list is resent 0.3 s later.
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_MAX_SECONDS", 30.0)
    client, ids = _failed_in_an_outage(backend, make_client, 3)
    before = backend.produce_requests
    wait_until(lambda: backend.produce_requests - before >= 4)
    time.sleep(0.1)
    backend.clear_fault()
    fresh = client.record(**RECORD)
    assert client.flush(5)
    started = time.monotonic()
    wait_until(lambda: client.stats()["failed_in_memory"] == 0)
    assert time.monotonic() - started < 2.5
    assert sorted(backend.event_ids()) == sorted(ids | {fresh})


@pytest.mark.usefixtures("fast_resends")
def test_an_event_failing_alone_when_resent_is_resent_again_later(
    backend: DevServer, make_client: Any
) -> None:
    # A resend where one record fails (retriably) while the others go through: that one
    # stays due, and goes out once the backend takes it.
    client, ids = _failed_in_an_outage(backend, make_client, 4)
    stuck = sorted(ids)[0]
    backend.set_fault("record_errors", event_ids=[stuck])
    wait_until(lambda: client.stats()["resent"] == 3)
    assert stuck not in backend.event_ids()
    backend.clear_fault()
    wait_until(lambda: client.stats()["failed_in_memory"] == 0, timeout=6)
    assert sorted(backend.event_ids()) == sorted(ids)
    assert client.stats()["retried"] >= 1 + 4  # (4 of the first outage, then the resends)


@pytest.mark.usefixtures("fast_resends")
def test_a_resend_failing_while_fresh_events_go_through_keeps_slowing_down(
    backend: DevServer, make_client: Any
) -> None:
    # The backend takes fresh events but keeps refusing one record (retriably): fresh
    # deliveries bring the resend forward once, not at every batch.
    client, ids = _failed_in_an_outage(backend, make_client, 1)
    backend.set_fault("record_errors", event_ids=sorted(ids))
    retried = client.stats()["retried"]
    ends = time.monotonic() + 4
    while time.monotonic() < ends:
        client.record(**{**RECORD, "tenant_id": "fresh"})
        time.sleep(0.05)
    resends = client.stats()["retried"] - retried
    # 0.3, 0.6, 1.2, 1.2 s apart: 4 or 5 in 4 s; brought forward at each batch, 13 or more
    assert 2 <= resends <= 7, resends
    assert client.stats()["failed_in_memory"] == 1


def test_close_does_not_spin_while_the_list_waits(backend: DevServer, make_client: Any) -> None:
    # close() waits for a fresh event's retry while the list's resend time has passed:
    # the sender thread sleeps meanwhile (it once looped, a core busy for close's timeout).
    client, _ = _failed_in_an_outage(backend, make_client, 2)
    client._sender._resend_at = 0.0  # type: ignore[union-attr]  # (due, as after 5 s)
    backend.set_fault("rate_limit", retry_after=5)
    client.record(**RECORD)  # refused: its retry waits out the Retry-After
    wait_until(lambda: client.stats()["retried"] > 2)
    cpu = time.process_time()
    client.close(timeout=1.5)
    assert time.process_time() - cpu < 0.6


def test_close_resends_here_when_no_thread_can_start(
    backend: DevServer, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At interpreter exit (Python 3.12) no new thread starts: close() resends in its own.
    client, ids = _failed_in_an_outage(backend, make_client, 3)
    backend.clear_fault()
    sender = client._sender
    assert sender is not None
    monkeypatch.setattr(sender, "_start_resend", lambda until=None: None)
    client.close(timeout=3)
    assert sorted(backend.event_ids()) == sorted(ids)


_EXITING_CHILD = """
import sys, time
from meter_core import MeterClient
url = sys.argv[1]
client = MeterClient(url, internal_url=url, device_id="d", max_retries=0, flush_interval=0.02)
for _ in range(3):
    client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
while client.stats()["failed_in_memory"] < 3:
    time.sleep(0.01)
print("kept", flush=True)
sys.stdin.readline()  # the backend is back: exit without close(), at once
"""


def test_process_exit_makes_a_last_resend(backend: DevServer) -> None:
    import subprocess
    import sys

    backend.set_fault("down")
    with subprocess.Popen(
        [sys.executable, "-c", _EXITING_CHILD, backend.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "kept"
            backend.clear_fault()
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(20) == 0
        finally:
            child.kill()
    assert len(set(backend.event_ids())) == 3


def test_close_right_after_an_outage_sends_what_waits_for_a_retry_and_the_list(
    backend: DevServer, make_client: Any
) -> None:
    # Stopped a second after the backend came back: events wait out a 10 s backoff and
    # others are in the in-memory list. close(2) sends both (it once waited for the
    # backoff, ran out of time, and made no resend: the list was lost).
    from meter_core.retry import RetryPolicy

    client, listed = _failed_in_an_outage(backend, make_client, 3)
    sender = client._sender
    assert sender is not None
    sender._policy = RetryPolicy(max_retries=3, backoff_base=10.0, backoff_cap=10.0)
    waiting = {client.record(**RECORD) for _ in range(2)}
    wait_until(lambda: client.stats()["retried"] >= 3 + 2)  # (3: the first outage's)
    backend.clear_fault()
    started = time.monotonic()
    client.close(timeout=2)
    assert time.monotonic() - started < 2.5
    assert sorted(backend.event_ids()) == sorted(listed | waiting)
    assert client.stats()["failed_in_memory"] == 0


@pytest.mark.usefixtures("fast_resends")
def test_the_sender_sleeps_while_a_resend_is_under_way(
    backend: DevServer, make_client: Any
) -> None:
    # Four batches resent from a slow backend: the sender thread (and a flush) wait
    # for the resend thread; they once looped for as long as its requests took.
    client, ids = _failed_in_an_outage(backend, make_client, 20, options={"batch_size": 5})
    backend.set_fault("slow", delay=0.7)
    wait_until(lambda: client.stats()["resent"] >= 5)
    cpu = time.process_time()
    time.sleep(1.5)
    assert time.process_time() - cpu < 0.5
    wait_until(lambda: client.stats()["failed_in_memory"] == 0)
    assert sorted(backend.event_ids()) == sorted(ids)


@pytest.mark.usefixtures("fast_resends")
def test_a_resend_comes_while_fresh_events_keep_joining_the_list(
    backend: DevServer, make_client: Any
) -> None:
    # Each fresh event is refused (retriably) and joins the list at once: the resend
    # 0.3 s after the first is not put off by each one that joins after it.
    client: MeterClient = make_client(max_retries=0)
    client.send(**RECORD)
    ends = time.monotonic() + 2
    while time.monotonic() < ends:
        event = client.event(**RECORD)
        backend.set_fault("record_errors", event_ids=[event.event_id])
        client.enqueue(event)
        time.sleep(0.1)
    assert client.stats()["resent"] >= 1


@pytest.mark.usefixtures("fast_resends")
def test_a_fresh_events_retry_after_holds_the_resend_back(
    backend: DevServer, make_client: Any
) -> None:
    client, ids = _failed_in_an_outage(backend, make_client, 3)
    backend.set_fault("rate_limit", retry_after=3)
    fresh = client.record(**RECORD)
    wait_until(lambda: client.stats()["retried"] >= 3 + 1)  # (3: the outage's)
    refused_at = time.monotonic()
    backend.clear_fault()
    time.sleep(2.2)
    assert backend.event_ids() == []  # neither the list nor the fresh event
    wait_until(lambda: len(backend.event_ids()) == 4)
    assert time.monotonic() - refused_at >= 2.8
    assert sorted(backend.event_ids()) == sorted(ids | {fresh})


@pytest.mark.usefixtures("fast_resends")
def test_a_resend_under_way_sends_no_request_after_close_returned(
    backend: DevServer, make_client: Any
) -> None:
    client, _ = _failed_in_an_outage(backend, make_client, 20, options={"batch_size": 5})
    backend.set_fault("slow", delay=1.0)
    wait_until(lambda: client.stats()["batches"] > 0 and client.stats()["resent"] == 0)
    time.sleep(0.5)  # (the resend's first request is on the wire)
    client.close(timeout=0.8)
    requests = backend.produce_requests
    time.sleep(2.5)
    assert backend.produce_requests - requests <= 1  # the one on the wire at the deadline


@pytest.mark.usefixtures("fast_resends")
def test_the_sender_sleeps_while_a_retry_after_holds_the_resend_back(
    backend: DevServer, make_client: Any
) -> None:
    client, _ = _failed_in_an_outage(backend, make_client, 2, "rate_limit", retry_after=4)
    cpu = time.process_time()
    time.sleep(2)
    assert time.process_time() - cpu < 0.5  # (it once looped until the Retry-After ended)
    assert client.stats()["failed_in_memory"] == 2


def test_close_resends_past_an_event_that_keeps_failing(
    backend: DevServer, make_client: Any
) -> None:
    # The oldest event of the list is refused (retriably) at every resend: close() goes
    # on with the others, batch after batch, and the refused one waits behind them.
    client: MeterClient = make_client(max_retries=0, batch_size=5)
    client.send(**RECORD)
    backend.reset()
    backend.set_fault("down")
    bad = client.event(**RECORD)
    client.enqueue(bad)
    good = {client.record(**RECORD) for _ in range(12)}
    wait_until(lambda: client.stats()["failed_in_memory"] == 13)
    backend.set_fault("record_errors", event_ids=[bad.event_id])
    client.close(timeout=3)
    assert sorted(backend.event_ids()) == sorted(good)
    assert [s.event.event_id for s in client.failed_events()] == [bad.event_id]


def test_a_resend_under_way_makes_no_lookup_after_close_returned(
    backend: DevServer, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A resend looks up 20 tenants, 5 at a time (their answers were never cached):
    # close()'s deadline stops it between two rounds of lookups, not after the whole batch.
    monkeypatch.setattr(sender_module, "FALLBACK_RETRY_SECONDS", 0.2)
    client: MeterClient = make_client(max_retries=0)
    backend.set_fault("down")
    for n in range(20):
        client.record(**{**RECORD, "tenant_id": f"t{n}"})
    wait_until(lambda: client.stats()["failed_in_memory"] == 20)
    backend.set_fault("slow", delay=0.3)
    lookups = len(backend.lookups)
    wait_until(lambda: len(backend.lookups) > lookups)  # the resend has begun
    client.close(timeout=0.5)
    after_close = len(backend.lookups)
    time.sleep(1.5)
    # (those on the wire at the deadline: the backend counts a lookup once it answers)
    assert len(backend.lookups) - after_close <= client.transport.lookup_concurrency == 5


@pytest.mark.usefixtures("fast_resends")
def test_fresh_events_failing_beside_others_going_through_do_not_hasten_resends(
    backend: DevServer, make_client: Any
) -> None:
    # One fresh event of every two is refused: the backend is up, the refused ones fail
    # for a reason of their own. Resends of the list (refused too) keep slowing down.
    client: MeterClient = make_client(max_retries=0)
    client.send(**RECORD)
    refused: list[str] = []
    ends = time.monotonic() + 3
    while time.monotonic() < ends:
        good, bad = client.event(**RECORD), client.event(**RECORD)
        refused.append(bad.event_id)
        backend.set_fault("record_errors", event_ids=refused)
        client.enqueue_many([good, bad])
        time.sleep(0.05)
    sender = client._sender
    assert sender is not None
    assert sender._resend_log.count <= 7  # failed passes: 0.3, 0.6, 1.2, 1.2 s apart


def test_a_log_handler_that_records_an_event_does_not_hang_the_client() -> None:
    # The app meters its own error lines: the in-memory list, full, logs a drop, and the
    # handler records an event that goes to the same list (the client is closed).
    from meter_core import MemoryTransport

    client = MeterClient(transport=MemoryTransport(), device_id="d", max_failed_in_memory=3)
    client.close(0)

    class Metering(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            client.record(**RECORD)

    handler = Metering(logging.ERROR)
    logging.getLogger("meter.store").addHandler(handler)
    try:
        done = threading.Event()

        def record_five() -> None:
            for _ in range(5):
                client.record(**RECORD)
            done.set()

        threading.Thread(target=record_five, daemon=True).start()
        assert done.wait(5)
    finally:
        logging.getLogger("meter.store").removeHandler(handler)
    stats = client.stats()
    assert stats["failed_in_memory"] == 3
    assert stats["dropped"] == stats["recorded"] - 3  # each drop counted once


def _customers_failing_for(tenant: str, error: Exception) -> Callable[[str], str]:
    def customer(tenant_id: str) -> str:
        if tenant_id == tenant:
            raise error
        return f"cust-{tenant_id}"

    return customer


@pytest.mark.usefixtures("fast_resends")
def test_a_retry_after_met_by_a_resend_ends_its_pass() -> None:
    # When the list is resent, one tenant's lookup answers 429 (Retry-After 30 s) while
    # the others go through: the pass stops after that batch, not sending the next ones.
    from meter_core import BackendUnavailable, MemoryTransport, RateLimited

    limited, down = threading.Event(), threading.Event()

    def customer(tenant_id: str) -> str:
        if tenant_id == "rl" and limited.is_set():
            raise RateLimited("too many lookups", retry_after=30)
        return f"cust-{tenant_id}"

    transport = MemoryTransport(customer)
    produce = transport.produce

    def produce_unless_down(records: Any) -> Any:
        if down.is_set():
            raise BackendUnavailable("down")
        return produce(records)

    transport.produce = produce_unless_down  # type: ignore[method-assign]
    client = MeterClient(transport=transport, device_id="d", max_retries=0, batch_size=5,
                         flush_interval=0.02)  # fmt: skip
    try:
        down.set()
        for _ in range(4):
            for tenant in ("acme", "acme", "acme", "acme", "rl"):
                client.record(**{**RECORD, "tenant_id": tenant})
        wait_until(lambda: client.stats()["failed_in_memory"] == 20)
        client.customer_cache.invalidate("rl")
        limited.set()
        lookups = len(transport.lookups)
        down.clear()
        wait_until(lambda: client.stats()["resent"] >= 4)
        time.sleep(0.5)
        assert len(transport.records) == 4  # one batch, then the pause
        assert transport.lookups[lookups:] == ["rl"]
    finally:
        client.close(0)


@pytest.mark.usefixtures("fast_resends")
def test_a_tenants_failing_lookups_do_not_bring_resends_forward() -> None:
    # The lookup of one tenant keeps failing; the others go through. Its events' own
    # retries fail alone (no produce request): that says nothing about the backend.
    from meter_core import BackendUnavailable, MemoryTransport

    transport = MemoryTransport(_customers_failing_for("bad", BackendUnavailable("lookup down")))
    client = MeterClient(transport=transport, device_id="d", max_retries=1, backoff_base=0.05,
                         backoff_cap=0.05, flush_interval=0.02)  # fmt: skip
    try:
        ends = time.monotonic() + 3
        while time.monotonic() < ends:
            client.record(**RECORD)
            client.record(**{**RECORD, "tenant_id": "bad"})
            time.sleep(0.05)
        sender = client._sender
        assert sender is not None
        assert sender._resend_log.count <= 7  # failed passes: 0.3, 0.6, 1.2, 1.2 s apart
    finally:
        client.close(0)
