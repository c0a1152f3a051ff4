"""The customer cache: TTL, negative cache, one lookup in flight per tenant."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from meter_core import BackendUnavailable, CustomerNotFound, MeterClient, RateLimited
from meter_core.customers import CustomerCache
from meter_core.devserver import DevServer


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


def test_a_full_cache_drops_expired_answers_then_the_oldest() -> None:
    calls: list[str] = []
    clock = Clock()
    cache = CustomerCache(lambda t: calls.append(t) or f"c-{t}", ttl=60, max_entries=3,
                          clock=clock)  # fmt: skip
    for tenant in ("a", "b"):
        cache.get(tenant)
    clock.now += 30
    cache.get("c")
    clock.now += 40  # a and b have expired; c has not
    cache.get("d")
    assert list(cache._entries) == ["c", "d"]  # (the expired ones went first)
    cache.get("e")
    cache.get("f")  # full: the oldest (c) makes room
    assert list(cache._entries) == ["d", "e", "f"]
    calls.clear()
    assert [cache.get(t) for t in ("d", "e", "f")] == ["c-d", "c-e", "c-f"]
    assert calls == []  # still cached


def test_a_tenant_asked_again_in_a_full_cache_drops_no_other_answer() -> None:
    # its own expired answer, behind live ones, makes the room it needs
    clock = Clock()

    def lookup(tenant: str) -> str:
        if tenant == "ghost" and clock.now < 1100:
            raise CustomerNotFound("no account")
        return f"c-{tenant}"

    cache = CustomerCache(lookup, ttl=300, negative_ttl=30, max_entries=3, clock=clock)
    cache.get("live-1")
    with pytest.raises(CustomerNotFound):
        cache.get("ghost")
    cache.get("live-2")
    clock.now += 101  # ghost's "no account" has expired, the live answers have not
    assert cache.get("ghost") == "c-ghost"
    assert list(cache._entries) == ["live-1", "live-2", "ghost"]


def test_a_full_cache_drops_expired_no_account_answers_before_a_live_one() -> None:
    # "no account" lives 30 s, an account 300 s: an expired "no account" behind a live
    # answer made no room, and the live answer was dropped (a lookup more for a tenant
    # that is billed)
    calls: list[str] = []
    clock = Clock()

    def lookup(tenant: str) -> str:
        calls.append(tenant)
        if tenant.startswith("ghost"):
            raise CustomerNotFound("no account")
        return f"c-{tenant}"

    cache = CustomerCache(lookup, ttl=300, negative_ttl=30, max_entries=3, clock=clock)
    cache.get("live-1")
    with pytest.raises(CustomerNotFound):
        cache.get("ghost")
    cache.get("live-2")
    clock.now += 31  # ghost's answer has expired
    cache.get("live-3")
    calls.clear()
    assert [cache.get(t) for t in ("live-1", "live-2", "live-3")] == ["c-live-1", "c-live-2",
                                                                       "c-live-3"]  # fmt: skip
    assert calls == []
    # full of live answers: a new "no account" makes room with the oldest of them...
    with pytest.raises(CustomerNotFound):
        cache.get("ghost-2")
    assert list(cache._entries) == ["live-2", "live-3"]
    # ...and a new live answer with the "no account" one first
    cache.get("live-4")
    assert list(cache._entries) == ["live-2", "live-3", "live-4"]
    assert cache.holds("live-2") and not cache.holds("ghost-2")


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


class Interrupted(BaseException):
    """As KeyboardInterrupt, SystemExit (gunicorn's SIGQUIT) or a gevent Timeout."""


def leader_and_waiter(
    cache: CustomerCache, started: threading.Event, release: threading.Event
) -> tuple[object, object]:
    """Ask for "acme" on a thread (the leader, whose lookup sets ``started`` then waits
    for ``release``), then on a second one that waits for the leader's answer; release
    it. Returns what each got: an answer, or the exception."""
    answers: dict[str, object] = {}

    def ask(who: str) -> None:
        try:
            answers[who] = cache.get("acme")
        except (Interrupted, BackendUnavailable) as exc:
            answers[who] = exc

    leader = threading.Thread(target=ask, args=("leader",))
    leader.start()
    assert started.wait(5)
    waiter = threading.Thread(target=ask, args=("waiter",))
    waiter.start()
    time.sleep(0.1)  # (the waiter is waiting for the leader's answer)
    release.set()
    leader.join(5)
    waiter.join(5)
    return answers["leader"], answers["waiter"]


def test_waiters_of_an_interrupted_lookup_get_a_retriable_error_not_no_customer() -> None:
    started, release = threading.Event(), threading.Event()

    def lookup(tenant: str) -> str:
        started.set()
        release.wait(5)
        raise Interrupted

    leader, waiter = leader_and_waiter(CustomerCache(lookup), started, release)
    assert isinstance(leader, Interrupted)
    assert isinstance(waiter, BackendUnavailable) and waiter.retriable, waiter
    assert "interrupted" in str(waiter)


@pytest.mark.parametrize("answer", [None, "", "   ", "\t", True, 1.5, ["c"]])
def test_a_lookup_answer_that_cannot_key_a_record_is_no_account(answer: object) -> None:
    calls: list[str] = []
    cache = CustomerCache(lambda t: calls.append(t) or answer, negative_ttl=60)
    with pytest.raises(CustomerNotFound, match="no usable customer id"):
        cache.get("acme")
    with pytest.raises(CustomerNotFound, match=r"no customer account .* \(cached\)"):
        cache.get("acme")
    assert calls == ["acme"]  # cached as "no account", briefly


@pytest.mark.parametrize("answer", ["cust-1", " C-pad ", 0, 42])
def test_string_and_int_customer_ids_are_used_as_answered(answer: object) -> None:
    assert CustomerCache(lambda t: answer).get("acme") == answer


@pytest.mark.parametrize("everything", [False, True])
def test_invalidate_during_a_lookup_keeps_its_answer_out_of_the_cache(everything: bool) -> None:
    owner = {"acme": "ACC-OLD"}
    read, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def lookup(tenant: str) -> str:
        calls.append(tenant)
        answer = owner[tenant]
        if len(calls) == 1:  # the first answer takes a while to come back
            read.set()
            release.wait(5)
        return answer

    cache = CustomerCache(lookup)
    first: list[str] = []
    asking = threading.Thread(target=lambda: first.append(cache.get("acme")))
    asking.start()
    assert read.wait(5)
    owner["acme"] = "ACC-NEW"  # the tenant moves; the app says so
    cache.invalidate(None if everything else "acme")
    assert cache.get("acme") == "ACC-NEW"  # asks again, not joining the lookup under way
    release.set()
    asking.join(5)
    assert first == ["ACC-OLD"]  # the lookup under way answers its own callers
    assert cache.get("acme") == "ACC-NEW" and len(calls) == 2  # and was not cached


def test_waiters_get_a_retriable_error_when_the_leader_is_interrupted_after_its_lookup() -> None:
    # (a signal handler raising while the answer is being cached)
    started, release = threading.Event(), threading.Event()

    def lookup(tenant: str) -> str:
        started.set()
        release.wait(5)
        return "cust-1"

    def clock() -> float:
        if release.is_set():
            raise Interrupted
        return 1000.0

    leader, waiter = leader_and_waiter(CustomerCache(lookup, clock=clock), started, release)
    assert isinstance(leader, Interrupted)
    assert waiter == "cust-1"  # the lookup had answered (never None, "no customer")


def test_a_send_interrupted_in_its_lookup_does_not_bill_the_senders_event_to_no_customer(
    backend: DevServer,
) -> None:
    # The app's thread looks "acme" up for send(); the sender thread, delivering a recorded
    # event of "acme", waits for that lookup; a signal handler (gunicorn's SIGQUIT calls
    # sys.exit) interrupts the app's thread in the middle of it.
    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    client = MeterClient(backend.url, internal_url=backend.url, device_id="d", flush_interval=0.05)
    try:
        backend.set_fault("slow", delay=1.5)
        app_thread = threading.get_ident()
        recorded: list[str] = []
        threading.Timer(0.3, lambda: recorded.append(client.record(tenant_id="acme",
                        meter_id="page.processed.basic", total_usage=7))).start()  # fmt: skip
        threading.Timer(0.8, signal.pthread_kill, (app_thread, signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            client.send(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        backend.clear_fault()
        assert client.flush(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        client.close()
    values = [r["value"] for r in backend.records]
    assert [v["event_id"] for v in values] == recorded
    assert [(r["key"], r["value"]["customer_id"]) for r in backend.records] == [
        ("cust-acme", "cust-acme")
    ]


def test_a_failed_lookup_backs_off_per_tenant_and_an_answer_ends_it() -> None:
    calls: list[str] = []
    clock = Clock()
    answers: dict[str, object] = {}

    def lookup(tenant: str) -> object:
        calls.append(tenant)
        answer = answers.get(tenant, BackendUnavailable(f"lookup of {tenant} failed: HTTP 500"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    cache = CustomerCache(lookup, clock=clock, failure_backoff=lambda n: 2.0**n)
    for _ in range(5):  # the same error at once, without a lookup, for 2 s
        with pytest.raises(BackendUnavailable, match="lookup of a failed: HTTP 500"):
            cache.get("a")
    assert calls == ["a"] and cache.holds("a")
    with pytest.raises(BackendUnavailable):
        cache.get("b")  # (another tenant: its own spell)
    clock.now += 2.1
    assert not cache.holds("a")
    with pytest.raises(BackendUnavailable):
        cache.get("a")
    clock.now += 2.1  # the second failure backs off 4 s
    with pytest.raises(BackendUnavailable):
        cache.get("a")
    assert calls == ["a", "b", "a"]
    clock.now += 2
    answers["a"] = "c-a"
    assert cache.get("a") == "c-a"
    cache.invalidate("a")
    answers["a"] = BackendUnavailable("down again")
    with pytest.raises(BackendUnavailable, match="down again"):
        cache.get("a")
    clock.now += 2.1  # (an answer ended the spell: the next one starts at 2 s again)
    answers["a"] = "c-a2"
    assert cache.get("a") == "c-a2"
    assert calls == ["a", "b", "a", "a", "a", "a"]


def test_a_lookup_api_failing_fast_is_not_stampeded_and_events_go_once_it_is_back(
    backend: DevServer,
) -> None:
    # A lookup API answering 500 at once: the sender's retries of small groups of
    # events (one per tenant) made about 4 lookups per event, 300 a second, with a core
    # a quarter busy, for as long as it failed (1,250 lookups in 3 s here).
    client = MeterClient(kafka_url=backend.url, internal_url=backend.url, device_id="d")
    try:
        backend.set_fault("down", status=500)
        tenants = [f"t{n}" for n in range(50)]
        started = time.monotonic()
        ids: list[str] = []
        while time.monotonic() - started < 3.0:
            for tenant in tenants[:10]:
                ids.append(
                    client.record(tenant_id=tenant, meter_id="page.processed.basic", total_usage=1)
                )
            tenants = tenants[10:] + tenants[:10]
            time.sleep(0.05)
        lookups = client.customer_cache.lookups
        # each tenant's lookups: two at once, then backing off 0.25, 0.5, 1, 2 s (half the
        # retry delays)
        assert lookups <= 7 * 50, (lookups, len(ids))
        backend.clear_fault()
        client.close(timeout=2)  # (events past their retries are resent from memory, their
        # tenants looked up again at once: the lookups of the outage backed off for seconds)
        assert sorted(backend.event_ids()) == sorted(ids)
    finally:
        client.close()


def test_a_lookup_blip_is_not_backed_off_nor_a_429() -> None:
    client = MeterClient("http://127.0.0.1:9", device_id="d", backoff_base=0.5, backoff_cap=30)
    try:
        # (two failures in a row are looked up again at once: a blip must not use up its
        # events' retries without a lookup; then half the retry ceiling)
        assert [client._lookup_backoff(n) for n in range(1, 6)] == [0, 0, 0.25, 0.5, 1.0]
        assert client._lookup_backoff(40) == 15.0
    finally:
        client.close()
    calls: list[str] = []

    def lookup(tenant: str) -> str:
        calls.append(tenant)
        raise RateLimited("slow down", retry_after=5)

    cache = CustomerCache(lookup, failure_backoff=lambda n: 60.0)
    for _ in range(3):  # the Retry-After says when: the sender waits for it
        with pytest.raises(RateLimited):
            cache.get("a")
    assert calls == ["a"] * 3
