"""Resending events claimed from a failure store, and what a run of it did: shared by
:func:`~meter_core.redeliver` (the retry commands) and the sender, which resends the
store's due events itself once the backend takes fresh ones again.

A claimed event is sent with its original ``event_id``, then marked delivered, or marked
failed with the reason and a backoff (:data:`RESEND_POLICY`) after which it is due again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from meter_core.customers import CustomerCache
from meter_core.delivery import OUT_OF_TIME, deliver_once
from meter_core.retry import RetryPolicy
from meter_core.store import FailureStore, StoredEvent
from meter_core.transport import Transport
from meter_core.wording import counted

__all__ = ["RESEND_POLICY", "RedeliveryReport", "resend_claimed"]

# Events reach the store after the sender's own retries, so their attempt count is
# already high and a resend that fails is due again after the cap: 2 minutes, so that a
# worker running every minute delivers them soon after the backend is back (with 10, one
# failed run during a 20 s blip held them 10 minutes past it).
RESEND_POLICY = RetryPolicy(max_retries=1_000_000, backoff_base=30.0, backoff_cap=120.0)


@dataclass
class RedeliveryReport:
    """What a :func:`~meter_core.redeliver` run (or a resend of the sender's) did."""

    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    #: Of ``failed``: events the backend refused for good (no customer account for the
    #: tenant, a record rejected). They stay owed, due again after the backoff (an
    #: account made meanwhile gets them billed), until an operator discards them.
    refused: int = 0
    batches: int = 0
    dry_run: bool = False
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """True when no event failed in this run."""
        return self.failed == 0

    @property
    def outage(self) -> bool:
        """True when events failed for a reason that may pass (the backend down, slow,
        limiting): a worker's next run that delivers says it is back."""
        return self.failed > self.refused

    def summary(self) -> str:
        verb = "would resend" if self.dry_run else "resent"
        text = (
            f"{verb} {counted(self.claimed, 'events')}: {self.delivered} delivered, "
            f"{self.failed} failed"
            f" ({self.batches} requests)"
        )
        for error, n in self.errors.most_common(5):
            text += f"\n  {n} x {error}"
        return text

    def refused_hint(self, discard_command: str) -> str | None:
        """The line the retry commands print when events were refused for good: what
        becomes of them, and ``discard_command`` (the command that gives up on a
        tenant's owed events, ``--tenant`` last). None when none was."""
        if not self.refused:
            return None
        return (
            f"{counted(self.refused, 'events')} refused for good stay owed and are tried again at "
            "each run after a backoff (at most 2 min), in case the tenant's customer "
            f"account is made; to give up on a tenant's: {discard_command} --tenant TENANT"
        )


def resend_claimed(
    claimed: list[StoredEvent],
    store: FailureStore,
    report: RedeliveryReport,
    *,
    transport: Transport,
    customers: CustomerCache,
    max_batch_bytes: int,
    batch_size: int,
    deadline: float,
    policy: RetryPolicy = RESEND_POLICY,
    stop: Callable[[], bool] | None = None,
) -> list[StoredEvent]:
    """Send ``claimed`` (leased from ``store``), starting no request after ``deadline``
    (monotonic) nor once ``stop()`` says so, and settle each event in the store:
    delivered, failed (due again after ``policy``'s delay, the attempt counted), or, not
    tried, released at once. Counts go to ``report``; returns the events delivered."""
    outcome = deliver_once(
        claimed,
        lambda s: s.event,
        transport=transport,
        customers=customers,
        max_batch_bytes=max_batch_bytes,
        max_records=batch_size,
        deadline=deadline,
        stop=stop,
    )
    report.batches += outcome.batches
    if outcome.delivered:
        store.mark_delivered([s.event.event_id for s in outcome.delivered])
        report.delivered += len(outcome.delivered)
    failures = [(error, group, False) for error, group in outcome.retriable]
    failures += [(error, group, True) for error, group in outcome.final]
    for error, group, for_good in failures:
        if error is OUT_OF_TIME:  # not tried: due again at once, for the next claim
            store.release([s.event.event_id for s in group])
            continue
        report.failed += len(group)
        if for_good:
            report.refused += len(group)
        report.errors[str(error)] += len(group)
        attempts = max(s.attempts for s in group) + 1
        store.mark_failed(
            [s.event.event_id for s in group],
            error=str(error),
            next_attempt_at=time.time() + policy.backoff(attempts, rng=lambda: 1.0),
        )
    return outcome.delivered
