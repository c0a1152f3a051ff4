"""Loss-free delivery under every fault, against the real local backend.

Each test records events, lets the fault act, and then checks the guarantee: every event
``record()`` accepted is delivered or stored, and after the backend recovers and the
stored events are resent, the backend holds every event id (exactly once, except where
the backend itself wrote a record and then failed the request, which only a stable
event id lets it deduplicate).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from meter_core import MeterClient, SQLiteSpool, redeliver
from meter_core.devserver import DevServer

RECORD = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 1}


def record_many(client: MeterClient, n: int, **overrides: Any) -> list[str]:
    return [client.record(**{**RECORD, **overrides}) for _ in range(n)]


def assert_exactly_once(backend: DevServer, accepted: list[str]) -> None:
    counts = collections.Counter(backend.event_ids())
    assert set(counts) == set(accepted), "an accepted event never arrived"
    assert all(n == 1 for n in counts.values()), "an event arrived twice"


def assert_accounted(backend: DevServer, spool: SQLiteSpool, accepted: list[str]) -> None:
    delivered = set(backend.event_ids())
    stored = {s.event.event_id for s in spool.claim(10**6, lease_seconds=0)}
    assert set(accepted) <= delivered | stored


def recover(backend: DevServer, spool: SQLiteSpool, client: MeterClient) -> None:
    backend.clear_fault()
    report = redeliver(spool, client)
    assert report.ok, report.summary()
    assert spool.pending_count() == 0


def test_backend_down_stores_everything_then_retry_delivers(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, max_retries=2)
    client.lookup_customer("acme")
    backend.set_fault("down")
    accepted = record_many(client, 50)
    assert client.flush(10)
    assert backend.records == []
    assert spool.pending_count() == 50
    stats = client.stats()
    assert stats["stored"] == 50 and stats["failed"] == 50 and stats["retried"] == 100
    assert "503" in spool.claim(1, lease_seconds=0)[0].last_error
    recover(backend, spool, client)
    assert_exactly_once(backend, accepted)


def test_html_502_is_retried_then_stored(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, max_retries=1)
    client.lookup_customer("acme")
    backend.set_fault("html502")
    accepted = record_many(client, 10)
    assert client.flush(10)
    (reason,) = spool.counts()["by_reason"]
    assert "HTTP 502" in reason and "non-JSON" in reason
    recover(backend, spool, client)
    assert_exactly_once(backend, accepted)


def test_transient_outage_is_ridden_out_by_retries(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, max_retries=5)
    client.lookup_customer("acme")
    backend.set_fault("down", times=2)
    accepted = record_many(client, 20)
    assert client.flush(10)
    assert spool.pending_count() == 0
    assert client.stats()["retried"] >= 20
    assert_exactly_once(backend, accepted)


def test_429_retry_after_is_honoured(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool)
    client.lookup_customer("acme")
    backend.set_fault("rate_limit", retry_after=1, times=1)
    started = time.monotonic()
    accepted = record_many(client, 5)
    assert client.flush(10)
    assert time.monotonic() - started >= 0.9
    assert backend.produce_requests == 2
    assert_exactly_once(backend, accepted)


def test_slow_backend_past_the_timeout_is_retried(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, timeout=0.3)
    client.lookup_customer("acme")
    backend.set_fault("slow", delay=0.8, times=1)
    accepted = record_many(client, 10)
    assert client.flush(10)
    assert spool.pending_count() == 0
    # The slow request was written after the client gave up on it: the resend carries the
    # same event ids, so the backend can drop the second copy.
    counts = collections.Counter(backend.event_ids())
    assert set(counts) == set(accepted)
    assert max(counts.values()) <= 2


def test_per_record_errors_are_retried_alone(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, batch_size=100, flush_interval=0.2)
    client.lookup_customer("acme")
    accepted = record_many(client, 10)
    backend.set_fault("record_errors", error_code=50003, every=2, times=1)
    assert client.flush(10)
    assert backend.produce_requests == 2
    first, second = (len(__import__("json").loads(b)["records"]) for b in backend.raw_bodies)
    assert first == 10
    assert second == 5  # only the failed records went again
    assert_exactly_once(backend, accepted)


def test_non_retriable_record_errors_are_stored_without_retry(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, batch_size=100, flush_interval=0.2)
    client.lookup_customer("acme")
    accepted = record_many(client, 4)
    backend.set_fault("record_errors", error_code=50002, every=2, times=1)
    assert client.flush(10)
    assert backend.produce_requests == 1
    assert spool.pending_count() == 2
    assert client.stats()["retried"] == 0
    recover(backend, spool, client)
    assert_exactly_once(backend, accepted)


def test_connection_refused_stores_then_retry_delivers(
    backend: DevServer, spool: SQLiteSpool, make_client: Any, closed_port_url: str
) -> None:
    offline = make_client(url=closed_port_url, failure_store=spool, max_retries=1)
    accepted = record_many(offline, 10)
    assert offline.flush(10)
    assert spool.pending_count() == 10
    assert "connection refused" in next(iter(spool.counts()["by_reason"]))
    recover(backend, spool, make_client())
    assert_exactly_once(backend, accepted)


def test_unknown_tenant_is_stored_without_retries(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, max_retries=5)
    backend.set_fault("unknown_tenant")
    accepted = record_many(client, 5, tenant_id="ghost")
    assert client.flush(10)
    assert backend.lookups == ["ghost"]
    assert backend.produce_requests == 0
    assert client.stats()["retried"] == 0
    assert spool.pending_count() == 5
    backend.clear_fault()
    client.customer_cache.invalidate()
    recover(backend, spool, client)
    assert_exactly_once(backend, accepted)


def test_malformed_reply_is_retried(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool)
    client.lookup_customer("acme")
    backend.set_fault("malformed", times=1)
    accepted = record_many(client, 10)
    assert client.flush(10)
    assert spool.pending_count() == 0
    assert_exactly_once(backend, accepted)


def test_partial_write_then_500_is_deduplicable_by_event_id(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, batch_size=100, flush_interval=0.2)
    client.lookup_customer("acme")
    backend.set_fault("partial_500", written=4, times=1)
    accepted = record_many(client, 10)
    assert client.flush(10)
    counts = collections.Counter(backend.event_ids())
    assert set(counts) == set(accepted)
    assert sorted(counts.values()) == [1] * 6 + [2] * 4


def test_backend_restarted_mid_batch(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, timeout=1.0, max_retries=8, backoff_cap=0.3)
    client.lookup_customer("acme")
    backend.set_fault("slow", delay=0.5, times=1)
    accepted = record_many(client, 20)
    time.sleep(0.2)  # the batch is in flight
    restarter = threading.Thread(target=lambda: (backend.stop(), time.sleep(0.3), backend.start()))
    restarter.start()
    restarter.join(10)
    assert client.flush(15)
    assert spool.pending_count() == 0
    counts = collections.Counter(backend.event_ids())
    assert set(counts) == set(accepted)


def test_close_while_the_backend_is_down_stores_everything_promptly(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, backoff_base=1, backoff_cap=5)
    client.lookup_customer("acme")
    backend.set_fault("down")
    accepted = record_many(client, 30)
    started = time.monotonic()
    client.close(timeout=1.0)
    assert time.monotonic() - started < 4
    assert_accounted(backend, spool, accepted)
    assert spool.pending_count() == 30
    recover(backend, spool, make_client())
    assert_exactly_once(backend, accepted)


def test_many_threads_recording_lose_nothing(backend: DevServer, make_client: Any) -> None:
    client = make_client(batch_size=50)
    ids: list[str] = []
    lock = threading.Lock()

    def worker(tenant: str) -> None:
        mine = record_many(client, 200, tenant_id=tenant)
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert client.flush(20)
    assert_exactly_once(backend, ids)
    assert sorted(set(backend.lookups)) == sorted(f"t{i}" for i in range(8))
    assert client.stats()["sent"] == 1600


def test_a_steady_stream_goes_out_in_full_batches_not_many_small_requests(
    backend: DevServer, make_client: Any
) -> None:
    # One event per millisecond for a second, while each produce request takes ~5 ms: a
    # sender that kept sending whatever had arrived would make hundreds of tiny requests.
    client = make_client(batch_size=100, flush_interval=0.2)
    backend.set_fault("slow", delay=0.005)
    ids = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        ids.append(client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1))
        time.sleep(0.001)
    assert client.flush(10)
    assert sorted(backend.event_ids()) == sorted(ids)
    assert backend.produce_requests <= len(ids) // 100 + 12


def test_a_rejected_batch_is_split_so_one_bad_record_does_not_hold_back_the_others(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, flush_interval=5.0)
    ids = [
        client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=i)
        for i in range(1, 65)
    ]
    poisoned = ids[37]
    backend.set_fault("reject", status=422, event_ids=[poisoned])
    assert client.flush(10)
    assert sorted(backend.event_ids()) == sorted(set(ids) - {poisoned})
    [stored] = spool.claim(10, lease_seconds=0)
    assert stored.event.event_id == poisoned
    assert "422" in stored.last_error
    assert backend.produce_requests <= 1 + 2 * 6  # a bisection, not one request per event


def test_a_refusal_of_every_record_is_not_split_without_bound(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    client = make_client(failure_store=spool, flush_interval=5.0)
    for i in range(500):
        client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=i)
    backend.set_fault("reject", status=422)
    assert client.flush(20)
    assert backend.event_ids() == []
    assert spool.pending_count() == 500  # every one kept, with the reason
    assert backend.produce_requests <= 64 + 10  # the split budget, plus the open halves


def test_close_while_the_sender_is_in_its_on_error_hook_stores_each_failure_once(
    backend: DevServer, spool: SQLiteSpool, make_client: Any
) -> None:
    # The thread has settled its batch (half delivered, half failed for good) and is in a
    # slow on_error hook when close() gives up waiting: close() must not store the batch
    # again, delivered events included.
    backend.set_fault("record_errors", every=2, error_code=42205)
    hook_calls: list[int] = []

    def slow_hook(events: Any, exc: BaseException) -> None:
        hook_calls.append(len(events))
        time.sleep(1.0)

    client = make_client(failure_store=spool, on_error=slow_hook)
    accepted = record_many(client, 10)
    deadline = time.monotonic() + 5
    while not hook_calls and time.monotonic() < deadline:
        time.sleep(0.005)
    client.close(timeout=0.1)
    time.sleep(1.2)
    delivered = set(backend.event_ids())
    stored = {s.event.event_id for s in spool.claim(100, lease_seconds=0)}
    assert delivered | stored == set(accepted) and not delivered & stored
    assert client.stats()["stored"] == len(stored) == 5
