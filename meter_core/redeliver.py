"""Resending stored events: the logic behind ``python -m meter_core retry`` and Django's
``retry_meter_events`` command (both are thin shells around :func:`redeliver`).

Events are claimed from a :class:`~meter_core.FailureStore` batch by batch (so several
workers can run at once without sending an event twice), sent with their original
``event_id``, then marked delivered, or marked failed with the reason and a backoff that
makes them due again later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meter_core.client import MeterClient
from meter_core.errors import ConfigurationError
from meter_core.resend import RESEND_POLICY, RedeliveryReport, resend_claimed
from meter_core.retry import RetryPolicy
from meter_core.store import DEFAULT_LEASE_SECONDS, FailureStore
from meter_core.wording import counted

__all__ = ["RedeliveryReport", "describe_leased", "describe_not_due", "redeliver"]


def describe_leased(count: int, first_lease_end: float | None) -> str | None:
    """The line the retry commands print about owed events a run left because a worker
    holds them (``count``, the first lease ending at ``first_lease_end``, epoch
    seconds): a send under way elsewhere, or a process that stopped during one. None
    when there are none."""
    if not count or first_lease_end is None:
        return None
    return (
        f"{counted(count, 'of them', 'are')} held by a worker (a send under way, or a "
        f"process stopped during one): due again when the lease ends, in "
        f"{_wait_text(first_lease_end)}"
    )


def _wait_text(at: float) -> str:
    wait = max(0.0, at - time.time())
    if wait < 120:
        return f"{wait:.0f}s"
    if wait < 7200:
        return f"{wait / 60:.0f} min"
    return f"{wait / 3600:.1f} h"


def describe_not_due(count: int, next_due_at: float | None) -> str | None:
    """The line the retry commands print about owed events a run left because they are
    not due yet (``count`` of them, the first due at ``next_due_at``, epoch seconds):
    right after an outage, or after a clock that jumped ahead, a run resends none of
    them and would otherwise not say why. None when there are none."""
    if not count or next_due_at is None:
        return None
    when = _wait_text(next_due_at)
    return f"{count} of them not due yet (the next in {when}): --now resends them at once"


def redeliver(
    store: FailureStore,
    client: MeterClient | None,
    *,
    limit: int | None = None,
    batch_size: int = 500,
    max_attempts: int | None = None,
    tenant_id: str | None = None,
    meter_id: str | None = None,
    dry_run: bool = False,
    backoff: RetryPolicy | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    progress: Callable[[RedeliveryReport], None] | None = None,
) -> RedeliveryReport:
    """Resend due events from ``store`` through ``client``'s transport and lookup cache.

    At most ``limit`` events (all due ones by default), ``batch_size`` per claim and per
    request. Events with ``max_attempts`` attempts or more are left alone. A failed event
    gets ``attempts + 1`` and is due again after the ``backoff`` policy's delay, so one run
    never sends the same event twice. ``dry_run`` claims and counts, sends nothing, and
    gives every claim back at the end; it never uses the client, so ``client`` may then
    be None. ``progress`` is called after each batch.

    Raises ConfigurationError, before claiming anything, when ``client`` is disabled
    (``enabled=False``): a disabled client must send nothing, resent events included.
    Raises ValueError when ``client`` is None and this is not a dry run.
    """
    if client is not None and not client.enabled:
        raise ConfigurationError(
            "the client is disabled (enabled=False): it sends nothing, so no stored event "
            "is resent; resend with an enabled client"
        )
    if client is None and not dry_run:
        raise ValueError("redeliver: a client is required to resend (only a dry run needs none)")
    policy = backoff or RESEND_POLICY
    if client is not None:
        # long enough for an attempt: 3 timeouts of its own, then one request of up to 3
        # tries of 2 timeouts each (as the sender's lease); the claim's lease is at least that
        lease_seconds = max(lease_seconds, 9 * client.options["timeout"] + 5)
    report = RedeliveryReport(dry_run=dry_run)
    held: list[str] = []
    try:
        while limit is None or report.claimed < limit:
            want = batch_size if limit is None else min(batch_size, limit - report.claimed)
            claimed = store.claim(
                want,
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
                tenant_id=tenant_id,
                meter_id=meter_id,
            )
            if not claimed:
                break
            report.claimed += len(claimed)
            if client is None or dry_run:
                held.extend(s.event.event_id for s in claimed)
            else:
                # Start no request once the rest of the lease could not cover one (up to
                # 3 tries of up to 2 timeouts each): the events must not outlive their
                # lease while being sent.
                budget = lease_seconds - 6 * client.options["timeout"] - 5  # >= 3 timeouts
                resend_claimed(
                    claimed,
                    store,
                    report,
                    transport=client.transport,
                    customers=client.customer_cache,
                    max_batch_bytes=client.options["max_batch_bytes"],
                    batch_size=batch_size,
                    deadline=time.monotonic() + budget,
                    policy=policy,
                )
            if progress is not None:
                progress(report)
    finally:
        if held:
            store.release(held)
    return report
