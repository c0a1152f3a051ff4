"""The customer cache: TTL, negative cache, one lookup in flight per tenant."""

from __future__ import annotations

import threading
import time

import pytest

from meter_core import BackendUnavailable, CustomerNotFound
from meter_core.customers import CustomerCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_cached_until_the_ttl_passes() -> None:
    calls: list[str] = []
    clock = Clock()
    cache = CustomerCache(lambda t: calls.append(t) or f"c-{t}", ttl=60, clock=clock)
    assert [cache.get("a") for _ in range(5)] == ["c-a"] * 5
    assert calls == ["a"]
    clock.now += 61
    cache.get("a")
    assert calls == ["a", "a"]


def test_no_account_is_cached_briefly() -> None:
    calls: list[str] = []
    clock = Clock()

    def lookup(tenant: str) -> str:
        calls.append(tenant)
        raise CustomerNotFound("none")

    cache = CustomerCache(lookup, ttl=300, negative_ttl=10, clock=clock)
    for _ in range(3):
        with pytest.raises(CustomerNotFound):
            cache.get("ghost")
    assert calls == ["ghost"]
    clock.now += 11
    with pytest.raises(CustomerNotFound):
        cache.get("ghost")
    assert calls == ["ghost", "ghost"]


def test_failures_are_not_cached() -> None:
    calls: list[str] = []

    def lookup(tenant: str) -> str:
        calls.append(tenant)
        if len(calls) == 1:
            raise BackendUnavailable("down")
        return "c"

    cache = CustomerCache(lookup)
    with pytest.raises(BackendUnavailable):
        cache.get("t")
    assert cache.get("t") == "c"
    assert len(calls) == 2


def test_one_lookup_in_flight_per_tenant() -> None:
    calls: list[str] = []
    gate = threading.Event()

    def slow_lookup(tenant: str) -> str:
        calls.append(tenant)
        gate.wait(5)
        return f"c-{tenant}"

    cache = CustomerCache(slow_lookup)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("t"))) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert results == ["c-t"] * 20
    assert calls == ["t"]


def test_waiters_get_the_leaders_error() -> None:
    gate = threading.Event()

    def lookup(tenant: str) -> str:
        gate.wait(5)
        raise CustomerNotFound("no account")

    cache = CustomerCache(lookup)
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            cache.get("t")
        except CustomerNotFound as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 5


def test_cache_is_bounded() -> None:
    cache = CustomerCache(lambda t: t, max_entries=10)
    for i in range(100):
        cache.get(str(i))
    assert len(cache._entries) <= 10


def test_a_lookup_that_breaks_or_does_not_finish_is_a_retriable_failure() -> None:
    def broken(tenant: str) -> str:
        raise RuntimeError("bug in a lookup")

    with pytest.raises(BackendUnavailable, match="bug in a lookup") as info:
        CustomerCache(broken).get("acme")
    assert info.value.retriable

    release = threading.Event()

    def stuck(tenant: str) -> str:
        release.wait(5)
        return "cust-1"

    cache = CustomerCache(stuck, wait_timeout=0.05)
    leader = threading.Thread(target=cache.get, args=("acme",))
    leader.start()
    time.sleep(0.02)
    try:
        with pytest.raises(BackendUnavailable, match="did not finish in time") as waited:
            cache.get("acme")  # waits for the leader's lookup, which is stuck
        assert waited.value.retriable
    finally:
        release.set()
        leader.join()
