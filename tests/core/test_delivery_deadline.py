"""One delivery attempt has a deadline: against a slow backend it starts no request after
it, so that it ends within the lease of the events it claimed from a store."""

from __future__ import annotations

import time
from typing import Any

from meter_core import BackendUnavailable, UsageEvent
from meter_core.delivery import deliver_once
from meter_core.devserver import DevServer


def test_no_request_starts_after_the_deadline_and_the_rest_is_retriable(
    backend: DevServer, make_client: Any
) -> None:
    client = make_client()
    # more new tenants than the transport looks up at once (5)
    tenants = [f"tenant-{n}" for n in range(12)]
    events = [UsageEvent(t, "dev", "page.processed.basic", 1) for t in tenants]
    backend.set_fault("slow", delay=0.3)  # every lookup (each tenant is new) takes 0.3 s
    started = time.monotonic()
    outcome = deliver_once(
        events, lambda e: e, transport=client.transport, customers=client.customer_cache,
        max_batch_bytes=1 << 20, deadline=started + 0.45,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    # two rounds of lookups started before the deadline (at 0 s and 0.3 s), none after
    assert elapsed < 0.45 + 0.3 + 0.2
    assert outcome.delivered == [] and outcome.final == [] and outcome.batches == 0
    [(error, group)] = outcome.retriable
    assert isinstance(error, BackendUnavailable) and "ran out of time" in str(error)
    assert group == events  # every event: none was sent, all go to the next attempt
    backend.clear_fault()
    assert backend.records == []
    time.sleep(0.4)  # (a lookup is counted once answered)
    assert len(backend.lookups) <= 10  # two rounds of 5 at most; none of the last 2 tenants


def test_without_a_deadline_every_event_is_tried(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    events = [UsageEvent(f"tenant-{n}", "dev", "page.processed.basic", 1) for n in range(3)]
    backend.set_fault("slow", delay=0.2)
    outcome = deliver_once(
        events, lambda e: e, transport=client.transport, customers=client.customer_cache,
        max_batch_bytes=1 << 20,
    )  # fmt: skip
    assert outcome.delivered == events
