"""Customer lookups of one delivery attempt run several at a time, against the real local
backend: a restart with many tenants is not held back by one lookup after another."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from meter_core import CustomerNotFound, HTTPTransport, UsageEvent
from meter_core.customers import CustomerCache
from meter_core.delivery import deliver_once
from meter_core.devserver import DevServer
from meter_core.lookups import MAX_LOOKUP_CONCURRENCY, look_up_together, lookup_concurrency

METER = "page.processed.basic"


def _events(tenants: list[str]) -> list[UsageEvent]:
    return [UsageEvent(tenant, "dev", METER, 1) for tenant in tenants]


def test_new_tenants_are_looked_up_several_at_a_time(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    tenants = [f"tenant-{n}" for n in range(20)]
    backend.set_fault("slow", delay=0.2)
    outcome = deliver_once(
        _events(tenants) * 2, lambda e: e, transport=client.transport,
        customers=client.customer_cache, max_batch_bytes=1 << 20,
    )  # fmt: skip
    assert len(outcome.delivered) == 40 and not outcome.retriable and not outcome.final
    assert sorted(backend.lookups) == sorted(tenants)  # each tenant once
    assert client.customer_cache.lookups == 20  # (counted under its lock)
    # the transport's concurrency (half its pool of 10), never more
    assert client.transport.lookup_concurrency == 5
    assert 3 <= backend.max_concurrent_lookups <= 5


def test_the_client_looks_new_tenants_up_together(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    backend.set_fault("slow", delay=0.1)
    for n in range(30):
        client.record(tenant_id=f"tenant-{n}", meter_id=METER, total_usage=1)
    assert client.flush(timeout=10)
    backend.clear_fault()
    assert len(backend.records) == 30
    assert backend.max_concurrent_lookups >= 3


def test_a_transport_with_a_small_pool_looks_up_one_at_a_time(backend: DevServer) -> None:
    transport = HTTPTransport(backend.url, internal_url=backend.url, pool_maxsize=3)
    assert transport.lookup_concurrency == 1
    backend.set_fault("slow", delay=0.05)
    outcome = deliver_once(
        _events([f"tenant-{n}" for n in range(6)]), lambda e: e, transport=transport,
        customers=CustomerCache(transport.lookup_customer), max_batch_bytes=1 << 20,
    )  # fmt: skip
    transport.close()
    assert len(outcome.delivered) == 6
    assert backend.max_concurrent_lookups == 1


def test_each_tenant_keeps_its_own_answer(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    backend.remove_customer("tenant-gone")
    backend.add_customer("tenant-b", "cust-42")
    tenants = ["tenant-a", "tenant-gone", "tenant-b", "tenant-c"]
    events = _events(tenants)
    outcome = deliver_once(
        events, lambda e: e, transport=client.transport, customers=client.customer_cache,
        max_batch_bytes=1 << 20,
    )  # fmt: skip
    assert outcome.delivered == [events[0], events[2], events[3]]
    [(error, group)] = outcome.final
    assert isinstance(error, CustomerNotFound) and group == [events[1]]
    keys = {r["value"]["tenant_id"]: r["key"] for r in backend.records}
    assert keys == {"tenant-a": "cust-tenant-a", "tenant-b": "cust-42", "tenant-c": "cust-tenant-c"}


def test_tenants_already_cached_are_not_looked_up_again(
    backend: DevServer, make_client: Any
) -> None:
    client = make_client()
    client.customer_cache.get("tenant-0")
    client.customer_cache.get("tenant-1")
    backend.reset()
    outcome = deliver_once(
        _events([f"tenant-{n}" for n in range(4)]), lambda e: e, transport=client.transport,
        customers=client.customer_cache, max_batch_bytes=1 << 20,
    )  # fmt: skip
    assert len(outcome.delivered) == 4
    assert sorted(backend.lookups) == ["tenant-2", "tenant-3"]


def test_no_lookup_starts_once_out_of_time(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    cache = client.customer_cache
    started = threading.Event()
    backend.set_fault("slow", delay=0.2)

    def out_of_time() -> bool:
        if started.is_set():
            return True
        started.set()  # the first lookup only
        return False

    answers, refused = look_up_together(
        [f"tenant-{n}" for n in range(10)], cache, concurrency=5, out_of_time=out_of_time
    )
    assert len(answers) == 1 and not refused
    assert len(backend.lookups) == 1


def test_without_threads_the_caller_looks_every_tenant_up(
    backend: DevServer, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As at interpreter exit on Python 3.12+, where no new thread can start.
    client = make_client()
    client.customer_cache.get("warm-up")  # (the client's own threads are started)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    tenants = [f"tenant-{n}" for n in range(6)]
    answers, refused = look_up_together(
        tenants, client.customer_cache, concurrency=5, out_of_time=lambda: False
    )
    assert answers == {t: f"cust-{t}" for t in tenants} and not refused


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 1), (0, 1), (-3, 1), (True, 1), (2.5, 1), ("4", 1), (1, 1), (6, 6), (1000, 16)],
)
def test_lookup_concurrency_reads_what_the_transport_allows(value: object, expected: int) -> None:
    class Transport:
        lookup_concurrency = value

    assert lookup_concurrency(Transport()) == expected
    assert lookup_concurrency(object()) == 1  # a transport written before: one at a time
    assert MAX_LOOKUP_CONCURRENCY == 16


class _Stop(BaseException):
    """What a custom transport, or a Ctrl-C, may raise in a lookup."""


def _slow_lookups(stop_when: Callable[[str], bool]) -> tuple[CustomerCache, list[str]]:
    made: list[str] = []

    def lookup(tenant: str) -> str:
        made.append(tenant)
        time.sleep(0.05)
        if stop_when(tenant):
            raise _Stop(tenant)
        return f"cust-{tenant}"

    return CustomerCache(lookup), made


def test_an_interrupted_caller_stops_the_lookups_and_raises() -> None:
    # Ctrl-C in the retry command: no lookup starts after it, and it is raised at once
    # the lookups under way have ended (not after every tenant of the attempt).
    caller = threading.current_thread()
    cache, made = _slow_lookups(lambda _: threading.current_thread() is caller)
    with pytest.raises(_Stop):
        look_up_together(
            [f"tenant-{n}" for n in range(40)], cache, concurrency=4, out_of_time=lambda: False
        )
    assert len(made) <= 8  # the caller's and those under way in the 3 helpers, at most twice


def test_a_base_exception_in_a_helper_reaches_the_caller() -> None:
    cache, made = _slow_lookups(lambda tenant: tenant == "tenant-2")
    with pytest.raises(_Stop, match="tenant-2"):
        look_up_together(
            [f"tenant-{n}" for n in range(40)], cache, concurrency=4, out_of_time=lambda: False
        )
    assert len(made) <= 8
