"""The background sender: batches queued events, delivers them, retries, stores failures.

One :class:`Sender` serves one client in one process (the client makes a new one in a
forked child, whose inherited queue belongs to the parent). Its thread is the only place
where the client does network I/O; ``enqueue`` only appends to a deque.

Guarantee: every event handed to :meth:`Sender.enqueue` ends in exactly one of these
states, each counted in the client's stats: delivered (the proxy gave it an offset),
written to the failure store, kept in the in-memory failure list, or dropped with an
ERROR log line (queue full with no store, in-memory failure list full). Without a
store, events kept in the in-memory list after a retriable failure are resent from it
(see :meth:`Sender._resend_kept`). Retries resend the same ``event_id``. An event in
flight when ``close()`` gives up waiting is stored too, so it may be both delivered and
stored: at-least-once, never lost; the backend drops the duplicate by ``event_id``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import operator
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import cast

from meter_core.customers import CustomerCache
from meter_core.delivery import OUT_OF_TIME, Outcome, deliver_once
from meter_core.errors import CustomerNotFound, DeliveryError, RateLimited, StoreError
from meter_core.events import UsageEvent
from meter_core.resend import RedeliveryReport, resend_claimed
from meter_core.retry import RetryPolicy
from meter_core.stats import DeliveryStats
from meter_core.store import FailureStore, MemoryFailureStore, StoredEvent
from meter_core.transport import Transport
from meter_core.usage import LogThrottle
from meter_core.wording import counted

__all__ = ["Sender", "SenderConfig"]

logger = logging.getLogger("meter.sender")

_ONLY_IN_MEMORY = (
    "kept only in memory (client.failed_events()): no failure store is set, so they are "
    "lost when the process exits; set failure_store= or spool_path="
)
_RESENT_FROM_MEMORY = (
    "kept in memory (client.failed_events()) and resent while the process lives, every 5 "
    "to 60 s: no failure store is set, so they are lost if it exits first; set "
    "failure_store= or spool_path="
)


# A spell of failed deliveries this long (the log throttles' interval) ends with a line.
_SPELL_WORTH_A_LINE = 10.0
# ... and the least spell after which the sender acts on the backend's return (sends what
# waits for a retry, makes the store's rows due): not after a blip.
_SPELL_WORTH_A_RECOVERY = 1.0


@dataclass(frozen=True, slots=True)
class SenderConfig:
    batch_size: int = 500
    max_batch_bytes: int = 1024 * 1024
    flush_interval: float = 0.5
    max_queue: int = 100_000
    durable: bool = False
    lease_seconds: float = 60.0
    attempt_seconds: float | None = None  # no new request after this long into an attempt


class _Item:
    """An event on its way, with the attempts made so far and where it came from."""

    __slots__ = ("attempts", "event", "from_store")

    def __init__(self, event: UsageEvent, attempts: int = 0, from_store: bool = False) -> None:
        self.event = event
        self.attempts = attempts
        self.from_store = from_store


# (attrgetter: called for every event sent, it costs a fraction of a Python function)
_event_of: Callable[[_Item], UsageEvent] = operator.attrgetter("event")


OnError = Callable[[Sequence[UsageEvent], BaseException], None]
# Events kept in memory while the failure store failed are offered to it again (they die
# with the process there): this long after they were kept, then twice as long after each
# failed offer, up to the maximum; also at the store's next successful write, and at close.
# Without a store, events kept there when their retries ran out are resent to the backend
# on the same schedule (see Sender._resend_kept).
FALLBACK_RETRY_SECONDS = 5.0
FALLBACK_RETRY_MAX_SECONDS = 60.0
#: Seconds a spill from a full queue, in the caller's thread, waits for a store locked
#: elsewhere (a store that can bound its waits: see SQLiteSpool.lock_wait_until).
SPILL_LOCK_WAIT = 1.0
# Lease of events taken from the in-memory list to resend (one resend at a time takes
# them: this is for a thread that died mid-request).
RESEND_LEASE_SECONDS = 600.0
# With a failure store (not in durable mode): the sender resends the store's due events
# that it or another process gave up on, when fresh events go through again after a
# spell of failures, and at most this often otherwise (the first time this long after it
# starts), this many at a time (the retry command does the rest: an idle app, a backlog).
STORE_RESEND_SECONDS = 30.0
STORE_RESEND_EVENTS = 2_000
STORE_RESEND_THREAD_NAME = "meter-store-resend"
# Every event of the in-memory list to resend is due: the resend's own schedule, on the
# monotonic clock, says when (a wall clock stepping back would hold them up otherwise).
_ANY_TIME = sys.float_info.max


class Sender:
    """Delivers events in the background for one client in one process.

    Thread-safe: ``enqueue`` from any thread; ``flush`` and ``close`` from any thread,
    any number of times. The thread starts on the first ``enqueue``.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        customers: CustomerCache,
        policy: RetryPolicy,
        config: SenderConfig,
        store: FailureStore | None,
        fallback: MemoryFailureStore,
        stats: DeliveryStats,
        on_error: OnError | None = None,
    ) -> None:
        self.pid = os.getpid()
        self._transport = transport
        self._customers = customers
        self._policy = policy
        self._config = config
        self._store = store
        self._fallback = fallback
        self._fallback_retry_at = 0.0  # monotonic time of the next offer to the store
        self._fallback_wait = FALLBACK_RETRY_SECONDS  # ...after a failed one
        self._offering = False  # an offer is running on its own thread
        self._drain_lock = threading.Lock()
        self._stats = stats
        self._on_error = on_error
        self._queue: deque[UsageEvent] = deque()
        self._max_queue = config.max_queue
        self._batch_size = config.batch_size
        self._retries: list[tuple[float, int, list[_Item]]] = []  # heap by due time
        self._retrying = 0  # events in self._retries: they count against max_queue too
        self._seq = itertools.count()
        self._inflight: list[_Item] = []
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._state_lock = threading.Lock()
        # Held while the sender thread takes a batch (marking it in flight) or schedules a
        # retry, and while close() collects what is left: no event is between the two.
        self._handoff = threading.Lock()
        # The sender thread settles the outcome of a batch that close() did not take over
        # (retries scheduled, failures stored): close() waits for it (see _took_over).
        self._settling = False
        self._settle_done = threading.Condition(self._handoff)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = False
        self._closed = False
        self._taken_over: list[_Item] | None = None  # the in-flight batch close() stored
        self._spilled = False
        # Durable mode: events this process stored since the last claim. Like the memory
        # queue, the store is read once per flush_interval, or at once when a batch is
        # full: waking up for every event would send batches of one or two (each a claim,
        # a request and a mark in the store), several times the work per event.
        self._stored_since_claim = 0
        self._dropping = False
        self._busy = False
        self._flush_waiters = 0
        self._retry_log = LogThrottle(logger, interval=10.0)
        self._failing_since: float | None = None  # (see _note_health)
        self._last_failure_at = 0.0
        self._fresh_ok = False  # the last attempt at fresh events delivered some
        # monotonic time of the next resend from the store (see _resend_stored), on its
        # own thread (a store locked elsewhere must not hold up delivery)
        self._store_resend_at = time.monotonic() + STORE_RESEND_SECONDS
        self._store_resending = False
        self._store_make_due = False  # the next pass first makes the store's rows due
        self._leased_at_close: list[str] = []  # (see release_at_exit)
        self._closed_at = 0.0  # monotonic time of close()
        self._pass_leased: list[str] = []  # rows a store resend has on the wire
        self._spell_failures = 0  # attempts failed one after another (see _note_health)
        self._recovered_at = -math.inf  # the last recovery after an outage
        self._failure_log = LogThrottle(logger, interval=10.0)
        self._store_log = LogThrottle(logger, interval=10.0)
        self._overflow_log = LogThrottle(logger, interval=10.0)
        self._claim_log = LogThrottle(logger, interval=10.0)
        self._closed_log = LogThrottle(logger, interval=10.0)
        self._store_refused_at_close = False  # (see _store_retries_now)
        # Without a store: resending the in-memory list (see _resend_kept), on a thread
        # of its own; one at a time (_resend_start_lock). A race between the sender
        # thread and it on these times makes a resend a little early or late, no more.
        self._resend_pending = False  # the list may hold events to resend
        self._resend_at = 0.0  # monotonic time of the next resend
        self._resend_wait = FALLBACK_RETRY_SECONDS  # ...after a failed one
        self._backend_not_before = 0.0  # monotonic end of the backend's latest Retry-After
        self._resend_hasten = False  # fresh events going through may bring it forward
        self._resend_thread: threading.Thread | None = None
        self._resend_start_lock = threading.Lock()
        # Held while events join the list (and _resend_pending is set) and while a resend
        # claims from it (and sets it from what it found): no event joins unseen.
        # (reentrant: a logging handler of the app may record an event while the list
        # logs a drop under it)
        self._resend_claim_lock = threading.RLock()
        self._resending = 0  # events of the list in the resend under way
        self._close_deadline: float | None = None  # close()'s: no resend request after it
        self._resend_log = LogThrottle(logger, interval=10.0)

    # -- caller side -------------------------------------------------------------------

    def enqueue(self, event: UsageEvent) -> None:
        """Accept an event for delivery. Never does network I/O; in durable mode it
        writes the event to the store first (raises StoreError if that fails)."""
        closed = self._closed  # (read into a local: checked again after the append)
        if closed:
            if self._config.durable:  # accepted only once in the store, as when open
                assert self._store is not None
                self._store.store([event])
                self._stats.add(recorded=1)  # (a durable event's own write: not "stored")
                return
            self._stats.add(recorded=1)
            self._store_final([_Item(event)], "client closed before delivery", count_failed=False)
            if self._store is None:  # held in this process's memory only: say so
                self._closed_log.log(
                    logging.ERROR,
                    "usage event recorded after the meter client was closed: kept in memory "
                    "only (failed_in_memory in stats()), lost when the process exits; record "
                    "before close(), or configure a failure store to keep such events",
                )
            return
        if self._config.durable:
            assert self._store is not None
            self._store.store([event])
            self._stats.add(recorded=1)
            if self._thread is None:
                self._start()
            self._stored_since_claim += 1  # (approximate under threads: a wake-up hint)
            if self._stored_since_claim >= self._batch_size and not self._wake.is_set():
                self._wake.set()
            return
        queue = self._queue
        # max_queue bounds every event held in memory, those waiting for a retry included:
        # during an outage new events go to the store (or are dropped, counted) instead of
        # piling up in memory, where a crash would take them.
        if len(queue) + self._retrying >= self._max_queue:
            self._overflow(event)
            return
        queue.append(event)  # counted as recorded when taken off (see DeliveryStats.lock)
        if self._closed:  # close() ran since the check above: it may have missed this one
            self._store_closed_queue()
            return
        if self._dropping:
            self._dropping = False
        if self._thread is None:
            self._start()
        if len(queue) >= self._batch_size and not self._wake.is_set():
            self._wake.set()  # (set() takes a lock: skip it while a wake-up is pending)

    def enqueue_many(self, events: Sequence[UsageEvent], *, hold: bool = False) -> None:
        """:meth:`enqueue` for several events; in durable mode they are written to the
        store in one call (one transaction: all of them or none). ``hold``: when that
        write fails, the events are queued in memory and sent as in default mode (see
        :meth:`_hold`) instead of raising StoreError."""
        if not self._config.durable or (not hold and (self._closed or len(events) < 2)):
            for event in events:
                self.enqueue(event)
            return
        assert self._store is not None
        try:
            self._store.store(list(events))
        except Exception as exc:  # StoreError, or any failure of a custom store
            if not hold:
                raise
            self._hold(events, exc)
            return
        self._stats.add(recorded=len(events))
        if self._closed:
            return
        if self._thread is None:
            self._start()
        self._stored_since_claim += len(events)
        if self._stored_since_claim >= self._batch_size and not self._wake.is_set():
            self._wake.set()

    def _hold(self, events: Sequence[UsageEvent], error: BaseException) -> None:
        """Durable events the store refused, from a caller that cannot take them back (an
        adapter, once the response is sent): queued in memory and sent as in default mode
        (bounded by ``max_queue``; what fails then goes to the store, or to the in-memory
        list while it still fails). A kill of the process meanwhile loses them."""
        self._store_log.log(
            logging.ERROR,
            "failure store unavailable (%s: %s): %d durable events queued in memory instead",
            type(error).__name__,
            error,
            len(events),
        )
        queue = self._queue
        for event in events:
            if len(queue) + self._retrying >= self._max_queue:
                self._overflow(event)
            else:
                queue.append(event)  # (counted as recorded when taken off)
        if self._closed:  # nothing sends them any more: to the store, or kept and logged
            self._store_closed_queue()
            return
        if self._thread is None:
            self._start()
        self._wake.set()

    def enqueue_blocks(self, count: int = 1) -> bool:
        """Whether enqueueing ``count`` events now would write to the store rather than
        only append to the queue: in durable mode, once closed, or when the queue has no
        room for them and a store takes the overflow."""
        return (
            self._config.durable
            or self._closed
            or (
                self._store is not None
                and len(self._queue) + self._retrying + count > self._max_queue
            )
        )

    def _store_closed_queue(self) -> None:
        leftover: list[_Item] = []
        with self._handoff:
            self._take_from_queue(leftover, None)
        if leftover:
            self._store_final(leftover, "client closed before delivery", count_failed=False)

    def _overflow(self, event: UsageEvent) -> None:
        if self._store is not None:
            try:
                # (in the caller's thread, a request's say: a spool locked by another
                # process is not waited for its whole busy timeout)
                with self._store_waits(SPILL_LOCK_WAIT):
                    self._store.store([event])
            except Exception as exc:  # StoreError, or any failure of a custom store
                # (throttled: during an outage of both, this runs for every new event)
                self._overflow_log.log(
                    logging.ERROR,
                    "meter queue is full (%d events) and the failure store failed: new "
                    "event dropped (see stats()['dropped']): %s: %s",
                    self._config.max_queue,
                    type(exc).__name__,
                    exc,
                )
                self._stats.add(recorded=1, dropped=1)  # (accepted by record(), then lost)
                return
            self._stats.add(recorded=1, stored=1)
            self._spilled = True
            self._wake.set()
            return
        self._stats.add(recorded=1, dropped=1)
        if not self._dropping:  # (a line per burst, and per 10 s at most: a queue that
            self._dropping = True  # drains a batch at a time starts a burst at each one)
            self._overflow_log.log(
                logging.ERROR,
                "meter queue is full (%d events) and no failure store is set: dropping new "
                "events until it drains (see stats()['dropped'])",
                self._config.max_queue,
                key="no store",
            )

    def _start(self) -> None:
        with self._state_lock:
            refused = self._closed
            if self._thread is None and not refused:
                self._thread = threading.Thread(target=self._run, name="meter-sender", daemon=True)
                self._thread.start()
        if refused:  # closed since enqueue() looked: what it appended must not stay queued
            self._store_closed_queue()

    def wake(self) -> None:
        """Make the sender thread run a cycle now (no-op before it started)."""
        self._wake.set()

    def queued(self) -> int:
        """Events in the queue, not yet taken by the sender thread."""
        return len(self._queue)

    def depth(self) -> int:
        """Events waiting in memory: queued, scheduled for retry, or in flight."""
        return len(self._queue) + self._retrying + len(self._inflight)

    def flush(
        self, timeout: float | None = None, *, store: bool = True, stop_at_retry: bool = False
    ) -> bool:
        """Send what is waiting now and wait until nothing is pending in memory (and, in
        durable mode with ``store``, nothing due is left in the store). True when that
        happened within ``timeout`` seconds; events waiting for a retry keep it waiting,
        unless ``stop_at_retry``: then it returns False as soon as some are. Once closed, it
        answers at once whether anything is left in memory: the store is then the retry
        command's."""
        if self._closed:
            # Nothing sends any more: events recorded since close() went to the store,
            # which is the retry command's from then on (as at close()), and waiting
            # for them would only use up the timeout.
            return self._settled(store=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state_lock:
            self._flush_waiters += 1
        try:
            while True:
                if self._settled(store):
                    return True
                if stop_at_retry and self._retrying and not self._retry_due():
                    return False  # (a retry due now is sent first: see flush_for_close)
                if self._worth_waking():
                    self._wake.set()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                with self._idle:
                    self._idle.wait(0.05 if remaining is None else min(0.05, remaining))
        finally:
            with self._state_lock:
                self._flush_waiters -= 1

    def _retry_due(self) -> bool:
        retries = self._retries
        return bool(retries) and retries[0][0] <= time.monotonic()

    def _worth_waking(self) -> bool:
        """Whether a flush waiting for the sender has something for it to do now (the
        queue, a due retry, due events in a durable store). Waking it for nothing at
        every cycle's end made a flush that waits for a retry (a 429's Retry-After, say)
        and the sender thread ping-pong, a core busy for the whole wait."""
        if self._queue:
            return True
        retries = self._retries
        if retries and retries[0][0] <= time.monotonic():
            return True
        if self._busy or self._inflight:
            return False  # (the cycle under way goes on: it needs no wake-up)
        return not retries  # (else only retries not due yet: the sender wakes for them)

    def _settled(self, store: bool = True) -> bool:
        if self._queue or self._retries or self._inflight or self._busy:
            return False
        if store and self._config.durable and self._store is not None:
            try:
                return not self._store.claim(
                    1, lease_seconds=0, max_attempts=self._policy.max_retries + 1
                )
            except Exception:  # nothing more to wait for: what it holds stays there
                self._store_log.log(logging.ERROR, "could not read the failure store")
        return True

    def release_at_exit(self) -> None:
        """At process exit, after close(): give back the store rows of a send that was
        still on the wire at close (it dies with the process), so that other workers
        send them at once rather than after their lease (95 s by default). Should the
        proxy have written them, the resend is dropped by event id."""
        leased, self._leased_at_close = self._leased_at_close, []
        if self._store_resending:
            leased += self._pass_leased  # (a store resend's send dies with the process too)
        if time.monotonic() - self._closed_at > self._config.lease_seconds:
            return  # (their lease is over: another worker may hold them now)
        if leased and self._store is not None:
            self._release(leased)

    @property
    def failure_store(self) -> FailureStore | None:
        """The store events go to when they cannot be delivered (None: memory only)."""
        return self._store

    def close(self, timeout: float | None = 5.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, then store everything
        still undelivered (queue, retries, in flight) and stop the thread. Idempotent.
        A store that can bound its waits (SQLiteSpool's ``lock_wait_until``) waits for a
        lock held elsewhere until then too (half a second at least per call), not for
        its whole busy timeout: what it could not take then is kept in memory, logged."""
        if self._closed:
            return
        with self._store_waits(timeout):
            self._close(timeout)

    def _store_waits(self, seconds: float | None) -> AbstractContextManager[object]:
        """A block in which a store that can bound its waits for a lock held elsewhere
        (SQLiteSpool.lock_wait_until) waits ``seconds`` at most (None: as it likes)."""
        bound = getattr(self._store, "lock_wait_until", None)
        if seconds is None or not callable(bound):
            return nullcontext()
        return cast(AbstractContextManager[object], bound(time.monotonic() + seconds))

    def _close(self, timeout: float | None) -> None:
        with self._state_lock:
            never_started = self._thread is None
            if never_started:  # never used: nothing to flush, and no I/O at exit
                self._closed = self._stopping = True
        if never_started:
            # a first record() may have appended meanwhile, its thread refused: keep it
            self._store_closed_queue()
            return
        on_sender_thread = threading.current_thread() is self._thread
        own_deadline = None if timeout is None else time.monotonic() + timeout
        if self._close_deadline is None:  # (a resend under way sends nothing after it)
            self._close_deadline = math.inf if timeout is None else time.monotonic() + timeout
        if not on_sender_thread:  # (a hook of the sender thread's could never see it settle)
            self.flush_for_close(timeout)
        self._closing = True  # (no periodic resend of the in-memory list from here on)
        with self._state_lock:
            self._stopping = True
            self._closed = True
            thread = self._thread
        self._wake.set()
        grace_end = time.monotonic() + 0.5  # (for the thread: see also _wait_settled)
        if thread is not None and thread is not threading.current_thread():
            thread.join(0.5)
        still_sending = thread is not None and thread.is_alive()
        with self._handoff:  # the sender thread takes no batch from here on (stopping)
            # In flight: the thread may still be sending them. Events of the queue are
            # stored (resent later with the same ids if that send succeeds after all);
            # store events keep their lease while it may, so no other worker sends them.
            # Called from the sender thread (a hook), the batch is the thread's to settle.
            inflight = [] if on_sender_thread else self._inflight
            if inflight:
                self._taken_over, self._inflight = inflight, []
            leftover = [i for i in inflight if not i.from_store]
            leased = [i.event.event_id for i in inflight if i.from_store]
            self._take_from_queue(leftover, None)
            for _, _, batch in self._retries:
                leftover.extend(batch)
            self._retries.clear()
            self._retrying = 0
        if leased and not still_sending and self._store is not None:
            self._release(leased)
        elif leased:
            # The send may still succeed: no other worker may send them meanwhile. At
            # process exit it dies with the process: see release_at_exit().
            self._leased_at_close = leased
        self._closed_at = time.monotonic()
        # a store that failed earlier may work again now (an offer already trying it, on
        # a store slow to fail, is not waited for past the timeout); not asked again when
        # it refused events moments ago, in flush_for_close
        refused = self._store_refused_at_close
        if not refused:
            self._drain_fallback(wait=timeout)
        if leftover:
            self._store_final(
                leftover, self._close_reason(leftover), count_failed=False, skip_store=refused
            )
        if not on_sender_thread:
            # (past the deadline, half a second for that write, as for any store write)
            self._wait_settled(None if own_deadline is None else max(own_deadline, grace_end + 0.5))
        # (the last word on failures whose lines the throttles held back)
        self._retry_log.report_held("until close")
        self._failure_log.report_held("until close")
        held = len(self._fallback)
        if held and self._store is None:
            # (those that failed for good earlier included: their one log line may have
            # been held back by its throttle, and this is the last word on them)
            earlier = max(0, held - len(leftover))  # (the list may have evicted some)
            resend = self._resend_thread
            resending = self._resending if resend is not None and resend.is_alive() else 0
            logger.error(
                "%s at close (%d undelivered now, %d failed earlier%s) %s %s",
                counted(held, "usage events"),
                held - earlier,
                earlier,
                f"; {resending} of them in a resend still under way, which may deliver them"
                if resending
                else "",
                "is" if held == 1 else "are",
                _ONLY_IN_MEMORY,
            )
        elif held:  # (the store failed: say what that costs)
            logger.error(
                "%s held only in memory at close, the failure store having "
                "refused them (failed_in_memory in stats()): they are lost when the process "
                "exits",
                counted(held, "usage events", "are"),
            )

    def _wait_settled(self, until: float | None) -> None:
        """Wait until the sender thread has settled a batch it was settling as close()
        collected the rest (its retries or failures stored from that thread): until
        ``until`` (a ``time.monotonic()`` value, this close()'s own: never the first
        close()'s deadline, which may be infinite; None: as long as it takes). Logged
        if it has not by then."""
        wait = None if until is None else max(0.0, until - time.monotonic())
        with self._settle_done:
            settled = self._settle_done.wait_for(lambda: not self._settling, wait)
        if not settled:
            logger.error(
                "close(): the sender was still storing the outcome of a batch when close() "
                "returned (a slow failure store): its events are lost if the process exits now"
            )

    def flush_for_close(self, timeout: float | None) -> None:
        # Durable mode: what is in the store is kept there, and any process sharing it (or
        # the next start) sends it; waiting until it is empty would hold every exit while
        # other processes keep writing to it.
        self._closing = True  # and no new batch is claimed from the store meanwhile
        if self._store is None:
            # What is in memory dies with us: this is its last chance. Retries are made
            # due now (their backoff could outlast the timeout, the backend back), and the
            # in-memory list is resent alongside the flush, then waited for.
            deadline = None if timeout is None else time.monotonic() + timeout
            self._customers.forget_failures()  # (their lookups are asked again, now)
            self._retry_now()
            self._last_resend(deadline, wait=False)
            self.flush(timeout, store=False)
            self._last_resend(deadline)
            return
        if self._settled(store=False):
            return
        if isinstance(self._store, MemoryFailureStore):
            self.flush(timeout, store=False)  # (as above)
            return
        # Events waiting for a retry (the backend is failing now) are not waited for once
        # the store has taken them: waiting out their backoff would hold up the exit (a
        # worker restarting during an outage, whose replacement the server starts only
        # once it has exited). A store that refuses them leaves the wait as it was.
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._fresh_ok:
            # The backend takes events: those waiting for a retry (the tail of an
            # outage) go now rather than to the store, within the timeout.
            self._customers.forget_failures()
            self._retry_now()

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        while not self.flush(left(), store=False, stop_at_retry=True):
            if left() == 0:
                return
            if not self._store_retries_now():
                self.flush(left(), store=False)
                return

    def _retry_now(self) -> None:
        """Make the events waiting in memory for a retry due now (not while the backend's
        Retry-After runs): at close() without a store, or with a backend that takes
        events, and when the backend takes events again after a spell of failures."""
        now = time.monotonic()
        if now < self._backend_not_before:
            return
        with self._handoff:
            if self._retries:
                self._retries = [(now, seq, batch) for _, seq, batch in self._retries]
                heapq.heapify(self._retries)
        self._wake.set()

    def _last_resend(self, deadline: float | None, *, wait: bool = True) -> None:
        """close() without a store: a last resend of the in-memory list (or the one under
        way), batch after batch while they succeed; ``wait``: waited for until
        ``deadline`` (None: until it ends). None while the backend's Retry-After runs."""
        now = time.monotonic()
        if not self._resend_pending or now < self._backend_not_before:
            return
        if deadline is not None and deadline <= now:
            return
        thread = self._start_resend()
        if not wait:
            return
        if thread is not None:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        else:  # no new thread (at interpreter exit, on Python 3.12): here, then; a request
            self._resend_kept()  # under way at the deadline may outlast it

    def _store_retries_now(self) -> bool:
        """Hand the events waiting for a retry to the store at once (close() is waiting);
        False, with them put back to wait, when the store refuses them."""
        assert self._store is not None
        with self._handoff:
            waiting, self._retries = self._retries, []
            count, self._retrying = self._retrying, 0
        items = [item for _, _, batch in waiting for item in batch]
        if not items:
            return True
        attempts = max([self._policy.max_retries + 1, *(i.attempts for i in items)])
        try:
            self._store.store(
                [i.event for i in items], error=self._close_reason(items), attempts=attempts
            )
        except BaseException as exc:  # (a gevent Timeout too: the events go back first)
            with self._handoff:
                for entry in waiting:
                    heapq.heappush(self._retries, entry)
                self._retrying += count
            # close() will not try it again for them: a store that fails slowly (a file
            # locked for its busy timeout) would hold the exit up twice
            self._store_refused_at_close = True
            if not isinstance(exc, Exception):
                raise
            logger.warning("close(): the failure store refused events waiting for a retry "
                           "(%s): waiting for their retry instead", exc)  # fmt: skip
            return False
        self._stats.add(stored=len(items))
        return True

    # -- sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._next_wait())
            self._wake.clear()
            try:
                self._busy = True
                self._cycle()
            except BaseException:
                # The thread must survive any bug of ours, and a BaseException that a hook
                # or a custom transport raises (gevent's Timeout): else nothing is sent.
                logger.exception("meter sender cycle failed")
            finally:
                self._busy = False
                with self._idle:
                    self._idle.notify_all()

    def _next_wait(self) -> float:
        wait = self._config.flush_interval
        retries = self._retries  # (one read: close() may swap the list meanwhile)
        if retries:
            wait = min(wait, max(0.0, retries[0][0] - time.monotonic()))
        if self._resend_pending and not self._closing and not self._resend_running():
            due = max(self._resend_at, self._backend_not_before)
            wait = min(wait, max(0.0, due - time.monotonic()))
        return wait

    def _resend_running(self) -> bool:
        """A resend of the in-memory list is under way (its thread wakes the sender when
        it ends: the sender does not look at the resend time meanwhile)."""
        thread = self._resend_thread
        return thread is not None and thread.is_alive()

    def _cycle(self) -> None:
        """Send what is due. The first batch goes whatever its size (the flush interval
        has passed, a full batch woke the sender, or a flush asked); after it, only full
        batches, unless a flush is waiting: a busy sender must not turn a steady stream
        of events into many small requests (each costs the app's process CPU)."""
        limit = self._config.batch_size
        if (
            self._store is not None
            and len(self._fallback)
            and not self._offering
            and time.monotonic() >= self._fallback_retry_at
        ):
            self._start_offer()
        items = self._take_in_flight()
        while items:
            self._deliver(items)
            more = len(items) >= limit or len(self._queue) >= limit or self._flush_waiters > 0
            items = self._take_in_flight() if more else []
        if (
            self._resend_pending
            and not self._closing
            and time.monotonic() >= max(self._resend_at, self._backend_not_before)
            and not self._resend_running()
        ):
            self._start_resend()
        if (
            self._fresh_ok
            and self._store is not None
            and not self._config.durable
            and not self._closing
            and not self._store_resending
            and time.monotonic() >= max(self._store_resend_at, self._backend_not_before)
        ):
            self._start_store_resend()

    def _start_store_resend(self) -> None:
        self._store_resend_at = time.monotonic() + STORE_RESEND_SECONDS
        self._store_resending = True
        try:
            threading.Thread(
                target=self._resend_stored, name=STORE_RESEND_THREAD_NAME, daemon=True
            ).start()
        except RuntimeError:  # no new thread at interpreter exit: the retry command will
            self._store_resending = False

    def _resend_stored(self) -> None:
        """Resend the failure store's due events (given up on, refused for good, or
        spilled from a full queue), by this process or another sharing the store, now
        that the backend takes fresh events: without it they waited for the retry
        command (a sidecar, a cron job), and a spool configured without one made an
        outage cost more than no store at all. After an outage, the store's rows are
        made due first. Up to STORE_RESEND_EVENTS (rows refused for good aside), each
        batch leased and settled as the retry command settles it (a failure is due
        again after its backoff); stops at a batch that delivers none for a retriable
        reason, and once close() begins."""
        try:
            self._resend_stored_pass()
        except BaseException:  # (a bug of ours: the next pass comes as usual)
            logger.exception("resending from the failure store failed unexpectedly")
        finally:
            self._store_resending = False

    def _resend_stored_pass(self) -> None:
        assert self._store is not None
        report = RedeliveryReport()
        attempt = self._config.attempt_seconds
        given_up_from = self._policy.max_retries + 1
        make_due = getattr(self._store, "make_due", None)
        if self._store_make_due and callable(make_due):
            self._store_make_due = False
            try:
                make_due()
            except Exception as exc:  # (the pass below tries the store again)
                self._claim_log.log(
                    logging.ERROR, "could not read the failure store: %s: %s",
                    type(exc).__name__, exc,
                )  # fmt: skip
        # Rows refused for good (no customer account) cost a lookup at most, and are due
        # again only after their backoff: they neither end a pass nor count in its share
        # (a backlog of them ahead of real events held these back pass after pass).
        while (
            report.claimed - report.refused < STORE_RESEND_EVENTS
            and report.claimed < 10 * STORE_RESEND_EVENTS
            and not self._closing
        ):
            try:
                claimed = self._store.claim(
                    self._config.batch_size, lease_seconds=self._config.lease_seconds
                )
                if not claimed:
                    break
                report.claimed += len(claimed)
                self._pass_leased = [c.event.event_id for c in claimed]
                refused, batches = report.refused, report.batches
                delivered = resend_claimed(
                    claimed,
                    self._store,
                    report,
                    transport=self._transport,
                    customers=self._customers,
                    max_batch_bytes=self._config.max_batch_bytes,
                    batch_size=self._config.batch_size,
                    deadline=math.inf if attempt is None else time.monotonic() + attempt,
                    stop=lambda: self._closing,
                )
            except Exception as exc:  # StoreError, or any failure of a custom store
                self._claim_log.log(
                    logging.ERROR,
                    "could not resend from the failure store: %s: %s",
                    type(exc).__name__,
                    exc,
                )
                break
            # Given-up events were counted failed: sent and resent, as from the in-memory
            # list; spilled ones were not: sent alone. (Counted batch by batch: stats()
            # follows the pass. Rows of other processes sharing the store count here
            # too, which the identity of stats() does not foresee.)
            self._pass_leased = []
            self._stats.add(
                sent=len(delivered),
                resent=sum(1 for s in delivered if s.attempts >= given_up_from),
                batches=report.batches - batches,
            )
            if not delivered and report.refused - refused < len(claimed):
                break  # (failing again: the next pass, or the retry command)
        if report.delivered:
            logger.info(
                "resent %s from the failure store",
                counted(report.delivered, "usage events"),
            )

    def _start_offer(self) -> None:
        """Offer the events kept in memory to the store on a thread of its own: a store
        that fails slowly (a file locked for its whole busy timeout) must not hold up
        delivery, nor, through a queue that fills meanwhile, the app's record() calls."""
        self._offering = True
        try:
            threading.Thread(
                target=self._offer_fallback, name="meter-fallback", daemon=True
            ).start()
        except RuntimeError:  # no new thread at interpreter exit: close() drains them
            self._offering = False

    def _offer_fallback(self) -> None:
        drained = False
        try:
            drained = self._drain_fallback(quiet=True)
        except Exception:  # (never expected: _drain_fallback logs its failures)
            logger.exception("offering events kept in memory to the failure store failed")
        finally:
            self._fallback_wait = (
                FALLBACK_RETRY_SECONDS
                if drained
                else min(self._fallback_wait * 2, FALLBACK_RETRY_MAX_SECONDS)
            )
            self._fallback_retry_at = time.monotonic() + self._fallback_wait
            self._offering = False

    def _take_in_flight(self) -> list[_Item]:
        """The next batch, marked in flight in the same step; [] once close() began (it
        then collects the queue, the retries and what is in flight: a batch is never
        taken and then dropped)."""
        with self._handoff:
            stopping = self._stopping  # (a local: read again after the claim below)
            if stopping:
                return []
            items = self._take_from_memory()
            self._inflight = items
        want = self._config.batch_size - len(items)
        if (
            want <= 0
            or self._store is None
            or not (self._config.durable or self._spilled)
            or self._closing
        ):
            return items
        # Outside the lock: a claim may wait on a busy file, and close() must not.
        claimed = self._claim_from_store(want)
        if not claimed:
            return items
        with self._handoff:
            stopped = self._stopping  # close() began while the claim ran
            if not stopped:
                items = self._inflight = items + claimed
        if stopped:  # close() has taken over what was in flight: give the claim back
            self._release([i.event.event_id for i in claimed])
            return []
        return items

    def _release(self, event_ids: list[str]) -> None:
        assert self._store is not None
        try:  # still queued in the store: another process, or the next start, sends them
            self._store.release(event_ids)
        except Exception:
            logger.exception("could not release %d leased events", len(event_ids))

    def _take_from_memory(self) -> list[_Item]:
        """Due retries first, then the queue, up to a batch."""
        limit = self._config.batch_size
        items: list[_Item] = []
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now and len(items) < limit:
            _, _, batch = heapq.heappop(self._retries)
            self._retrying -= len(batch)
            items.extend(batch)
        queue = self._queue
        if queue and len(items) < limit:
            self._take_from_queue(items, limit)
        return items

    def _take_from_queue(self, items: list[_Item], limit: int | None) -> None:
        """Move queued events to ``items`` (until it holds ``limit``; None: all)."""
        queue = self._queue
        with self._stats.lock:
            before = len(items)
            while queue and (limit is None or len(items) < limit):
                items.append(_Item(queue.popleft()))
            self._stats.recorded += len(items) - before

    def _claim_from_store(self, limit: int) -> list[_Item]:
        assert self._store is not None
        self._stored_since_claim = 0
        try:
            claimed = self._store.claim(
                limit,
                lease_seconds=self._config.lease_seconds,
                # events the sender gave up on are left to the retry command
                max_attempts=self._policy.max_retries + 1 if self._config.durable else 1,
            )
        except Exception as exc:  # StoreError, or any failure of a custom store: the
            # batch already taken from memory must still be delivered. (Throttled: a file
            # locked for long fails every poll; the traceback is at debug level.)
            self._claim_log.log(
                logging.ERROR, "could not read the failure store: %s: %s", type(exc).__name__, exc
            )
            logger.debug("could not read the failure store", exc_info=True)
            return []
        if not claimed and not self._config.durable:
            self._spilled = False
        return [_Item(s.event, s.attempts, from_store=True) for s in claimed]

    def _attempt(
        self, items: list[_Item], stop: Callable[[], bool] | None = None
    ) -> Outcome[_Item]:
        """One delivery attempt at ``items``, starting no request after the attempt's
        time (``attempt_seconds``), nor once ``stop()`` says so."""
        attempt = self._config.attempt_seconds
        return deliver_once(
            items,
            _event_of,
            transport=self._transport,
            customers=self._customers,
            max_batch_bytes=self._config.max_batch_bytes,
            max_records=self._config.batch_size,
            deadline=None if attempt is None else time.monotonic() + attempt,
            stop=stop,
        )

    def _deliver(self, items: list[_Item]) -> None:
        try:
            self._deliver_and_settle(items)
        finally:
            with self._settle_done:
                self._settling = False
                self._settle_done.notify_all()

    def _deliver_and_settle(self, items: list[_Item]) -> None:
        try:
            outcome = self._attempt(items)
            self._stats.add(batches=outcome.batches)
            self._delivered(outcome.delivered)
            self._note_health(bool(outcome.delivered), bool(outcome.retriable))
            if (
                outcome.batches
                and outcome.retriable
                and not outcome.delivered
                and self._resend_pending
            ):
                # the backend fails whole produce requests of fresh events too (not the
                # lookup of one tenant): its next success means it is back
                self._resend_hasten = True
            if self._took_over(items):  # close() stored the batch while it was sent
                return
            for error, group in outcome.retriable:
                self._stats.error(str(error))
                self._retry_or_fail(group, error)
            for error, group in outcome.final:
                self._fail(group, error)
        except BaseException:
            # A bug of ours (or a BaseException from a custom transport) must not lose the
            # batch: keep it for the retry command.
            logger.exception("delivery of %s failed unexpectedly", counted(len(items), "events"))
            if not self._took_over(items):
                self._store_final(
                    [i for i in items if not i.from_store], "internal error", count_failed=True
                )

    def _note_health(self, delivered: bool, failed: bool) -> None:
        """Follow failing spells of fresh deliveries: an attempt that delivered nothing
        and failed for a retriable reason (the backend down, slow, limiting; the lookup
        API down) starts one or makes it last; the next attempt that delivers ends it.
        A spell of at least the log throttles' interval (10 s) ends with a line saying
        so, followed by what the throttles held back meanwhile (without it, the count of
        the spell's last seconds would never be told); a blip (one failed attempt, a
        flapping replica) only adds to the throttled lines."""
        now = time.monotonic()
        if delivered or failed:
            self._fresh_ok = delivered
        if delivered:
            if (
                self._failing_since is not None
                and self._spell_failures >= 2
                and now - self._failing_since >= _SPELL_WORTH_A_RECOVERY
                and now >= self._recovered_at + STORE_RESEND_SECONDS
            ):
                # Back after an outage (attempts failing one after another for a while,
                # not one tenant's or one event's failures between others' deliveries):
                # what waits for a retry goes now (its backoff grew with the outage), and
                # so do the store's rows (see _resend_stored), those a retry worker pushed
                # back during it too. At most once per STORE_RESEND_SECONDS.
                self._recovered_at = now
                self._retry_now()
                self._store_resend_at = now
                self._store_make_due = True
            self._spell_failures = 0
            began, last = self._failing_since, self._last_failure_at
            self._failing_since = None
            if began is not None and last - began >= _SPELL_WORTH_A_LINE:
                logger.warning(
                    "meter backend takes events again, after %.0fs of failed deliveries",
                    last - began,
                )
                self._retry_log.report_held("until the backend took events again")
                self._failure_log.report_held("until the backend took events again")
        elif failed:
            if self._failing_since is None:
                self._failing_since = now
            self._last_failure_at = now
            self._spell_failures += 1

    def _took_over(self, items: list[_Item]) -> bool:
        """Settle who owns the outcome of the batch just sent, in one step: close() (it
        stored the batch: True), or this thread (the batch is no longer in flight, so a
        close() from now on leaves it alone)."""
        with self._handoff:
            if self._taken_over is items:
                return True
            self._inflight = []
            # From here the batch is in no list close() collects: until it is settled
            # (a store write, at close), close() waits, or the process could exit first.
            self._settling = True
            return False

    def _delivered(self, items: list[_Item]) -> None:
        if not items:
            return
        self._stats.add(sent=len(items))
        if self._resend_hasten:  # the backend takes events again: resend soon (once: a
            self._resend_hasten = False  # resend failing now fails for its own reason)
            soon = max(self._backend_not_before, time.monotonic() + FALLBACK_RETRY_SECONDS)
            self._resend_at = min(self._resend_at, soon)
        if self._store is None:  # (then no item came from a store)
            return
        stored_ids = [i.event.event_id for i in items if i.from_store]
        if stored_ids:
            try:
                self._store.mark_delivered(stored_ids)
            except StoreError:
                # They stay leased, then due again: resent later, deduplicated by event_id.
                logger.exception("could not mark %d delivered events in the store", len(stored_ids))

    def _retry_or_fail(self, items: list[_Item], error: DeliveryError) -> None:
        retry_after = error.retry_after if isinstance(error, RateLimited) else None
        retry_now: list[_Item] = []
        give_up: list[_Item] = []
        tried = error is not OUT_OF_TIME  # (cut off by the attempt's deadline: not tried)
        # Closed while they were sent: not retried here, nor failed for good (no failed
        # count, no on_error); stored below as events undelivered at close.
        closed = self._closed
        if retry_after:  # (resends of the in-memory list honour it too)
            self._backend_not_before = max(self._backend_not_before, time.monotonic() + retry_after)
        for item in items:
            item.attempts += tried
            (retry_now if self._policy.can_retry(item.attempts) else give_up).append(item)
        if give_up:
            waiting = self._resend_pending  # (a resend is scheduled already)
            self._fail(give_up, error, attempts_done=True)
            if self._store is None and not closed:  # resent from the in-memory list
                self._schedule_resend(retry_after, scheduled=waiting)
        if not retry_now:
            return
        attempt = max(i.attempts for i in retry_now)
        delay = self._policy.backoff(attempt, retry_after=retry_after)
        if not closed:
            self._stats.add(retried=len(retry_now))
        in_store = [i for i in retry_now if i.from_store]
        if in_store:
            assert self._store is not None
            try:
                self._store.mark_failed(
                    [i.event.event_id for i in in_store],
                    error=str(error),
                    next_attempt_at=time.time() + delay,
                )
            except StoreError:
                logger.exception("could not record a failed attempt in the store")
        in_memory = [i for i in retry_now if not i.from_store]
        if in_memory:
            due = time.monotonic() + delay
            with self._handoff:
                scheduled = not self._closed  # close() has collected the retries already
                if scheduled:
                    heapq.heappush(self._retries, (due, next(self._seq), in_memory))
                    self._retrying += len(in_memory)
            if not scheduled:
                self._store_final(in_memory, self._close_reason(in_memory), count_failed=False)
        if closed:
            return
        self._retry_log.log(
            logging.WARNING,
            "delivery of %s failed (%s); retry %d in %.2fs",
            counted(len(retry_now), "events"),
            error,
            attempt,
            delay,
            key=_kind(error),  # (no events=: the same events come back at each retry)
        )

    def _fail(self, items: list[_Item], error: DeliveryError, attempts_done: bool = False) -> None:
        """Events that will not be retried by the sender: to the store, with the reason."""
        if not attempts_done:
            for item in items:
                item.attempts += 1
        # Without a store, the sender goes on resending what failed for a retriable
        # reason (an outage longer than the retries), slowly; not what was refused.
        resend = self._store is None and error.retriable
        if self._store is not None:
            kept = "kept for the retry command"
        else:
            kept = _RESENT_FROM_MEMORY if resend else _ONLY_IN_MEMORY
        self._failure_log.log(
            logging.ERROR,
            "%s not delivered, %s: %s",
            counted(len(items), "usage events"),
            kept,
            error,
            key=_kind(error),  # (steady refusals of one kind do not hide an outage's line)
            events=len(items),
        )
        self._stats.error(str(error))
        self._store_final(items, str(error), count_failed=True, resend=resend)
        if self._on_error is not None:
            try:
                self._on_error([i.event for i in items], error)
            except Exception:
                logger.exception("on_error hook raised")

    def _drain_fallback(self, *, quiet: bool = False, wait: float | None = None) -> bool:
        """Move the events kept in memory while the failure store failed into the store
        (they would die with the process there); False when it failed again, or when
        another drain held on for more than ``wait`` seconds. Left in memory then: logged
        with its traceback, or, ``quiet`` (the periodic offer), as one throttled line."""
        if self._store is None or not len(self._fallback):
            return True
        # (close() may drain while the offer thread does)
        if not self._drain_lock.acquire(timeout=-1 if wait is None else max(0.0, wait)):
            logger.error(
                "%s kept in memory not moved to the failure store: it is still being tried, slowly",
                counted(len(self._fallback), "events"),
            )
            return False
        try:
            groups: dict[tuple[str, int], list[UsageEvent]] = {}
            for held in self._fallback.events():
                groups.setdefault((held.last_error, held.attempts), []).append(held.event)
            for (error, attempts), events in groups.items():
                try:
                    self._store.store(events, error=error, attempts=attempts)
                except Exception as exc:
                    if quiet:
                        self._store_log.log(
                            logging.WARNING,
                            "failure store still unavailable (%s): %s in memory",
                            exc,
                            counted(len(self._fallback), "events", "stay"),
                        )
                    else:
                        logger.exception(
                            "failure store unavailable: %s in memory",
                            counted(len(self._fallback), "events", "stay"),
                        )
                    return False
                # (one evicted from the full in-memory list meanwhile was counted as
                # dropped there: not counted twice)
                moved = self._fallback.discard([e.event_id for e in events])
                self._stats.add(stored=moved)
                logger.warning(
                    "%s kept in memory moved to the failure store", counted(len(events), "events")
                )
        finally:
            self._drain_lock.release()
        return True

    def _close_reason(self, items: list[_Item]) -> str:
        """The reason events stored at close are kept with: with the client's last
        delivery error when some of them were tried (what an operator looks for)."""
        last = self._stats.last_error
        if last and any(i.attempts for i in items):
            return f"undelivered at close (last delivery error: {last})"
        return "undelivered at close"

    def _store_final(
        self,
        items: list[_Item],
        reason: str,
        *,
        count_failed: bool,
        skip_store: bool = False,
        resend: bool = False,
    ) -> None:
        """Hand events to the failure store (or the in-memory fallback) for the retry
        command. Sender-side attempts are marked as used up. ``skip_store``: the store
        refused events a moment ago; they go to the in-memory list without asking it.
        ``resend`` (no store): the sender resends them from the in-memory list; the
        others are kept there never due (``next_attempt_at`` infinite)."""
        if count_failed:
            self._stats.add(failed=len(items))
        attempts = max([self._policy.max_retries + 1, *(i.attempts for i in items)])
        events = [i.event for i in items]
        if self._store is not None:
            try:
                if skip_store:
                    raise StoreError("it refused events waiting for a retry at close")
                self._store.store(events, error=reason, attempts=attempts)
            except Exception:  # StoreError, or any failure of a custom store
                logger.exception(
                    "failure store unavailable: keeping %s in memory",
                    counted(len(events), "events"),
                )
                # counted as stored once they reach the store; offered again from then on
                self._fallback_retry_at = max(
                    self._fallback_retry_at, time.monotonic() + FALLBACK_RETRY_SECONDS
                )
                dropped = self._fallback.store_counted(events, error=reason, attempts=attempts)
                self._stats.add(dropped=dropped)
                return
            self._stats.add(stored=len(events))
            self._drain_fallback()  # the store works again: what it missed goes there
            return
        # No store: kept in the in-memory list (failed_in_memory), not "stored"
        with self._resend_claim_lock:
            dropped = self._fallback.store_counted(
                events,
                error=reason,
                attempts=attempts,
                next_attempt_at=None if resend else math.inf,
            )
            if resend:
                self._resend_pending = True
        self._stats.add(dropped=dropped)

    # -- resending the in-memory list (no failure store) -------------------------------

    def _schedule_resend(self, retry_after: float | None, *, scheduled: bool) -> None:
        """Events just joined the in-memory list for want of a store: resend them once
        the backend has had time to come back (not sooner than its Retry-After). When a
        resend is ``scheduled`` already, they go with it (pushed back at each event
        joining, it would never come while events keep joining)."""
        now = time.monotonic()
        if retry_after:
            self._backend_not_before = max(self._backend_not_before, now + retry_after)
        if not scheduled:  # (the first to join: the next fresh success means the
            self._resend_at = now + self._resend_wait  # backend is back)
            self._resend_hasten = True

    def _start_resend(self) -> threading.Thread | None:
        """Start a resend of the in-memory list on a thread of its own (fresh events never
        wait for it), unless one is under way: that one is returned; None when no thread
        could start."""
        with self._resend_start_lock:
            running = self._resend_thread
            if running is not None and running.is_alive():
                return running
            # (provisional, so that the sender does not start another meanwhile: the
            # resend sets the real time when it ends)
            self._resend_at = time.monotonic() + FALLBACK_RETRY_MAX_SECONDS
            thread = threading.Thread(target=self._resend_kept, name="meter-resend", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no new thread at interpreter exit
                self._resend_at = time.monotonic() + FALLBACK_RETRY_SECONDS
                return None
            self._resend_thread = thread
            return thread

    def _resend_kept(self) -> None:
        """Resend events of the in-memory list whose retries ran out on a retriable
        failure (no store: nothing else ever would), in requests of their own, batch
        after batch while each delivers some (a batch that delivers none ends the pass:
        the backend is failing). One resend at a time for the whole client: the first
        5 s after events join the list, then twice as long after each pass that
        delivered none, up to 60 s, never sooner than a Retry-After, and within 5 s once
        fresh events go through again after a failure of theirs. Delivered: counted in
        ``sent`` and ``resent`` (they stay in ``failed``); failed again: in ``retried``,
        and put behind the others (one that keeps failing does not hold them back);
        refused for good now: kept, never due again. No request starts after close()'s
        deadline, once close() began."""
        claimed: list[StoredEvent] = []
        delivered = failed = 0
        errors: list[BaseException] = []
        retry_after: float | None = None
        try:
            while True:
                if self._resend_stopped():
                    break
                with self._resend_claim_lock:
                    claimed = self._fallback.claim(
                        self._batch_size, lease_seconds=RESEND_LEASE_SECONDS, due_by=_ANY_TIME
                    )
                    self._resend_pending = bool(claimed)
                if not claimed:  # all sent, evicted, or refused for good
                    break
                outcome = self._resend_batch(claimed)
                claimed = []
                delivered += len(outcome.delivered)
                for error, group in outcome.retriable:
                    if error is not OUT_OF_TIME:
                        failed += len(group)
                        errors.append(error)
                        if isinstance(error, RateLimited) and error.retry_after is not None:
                            retry_after = max(retry_after or 0.0, error.retry_after)
                if (
                    not outcome.delivered
                    or retry_after  # (the backend asked for a pause: not one more batch)
                    or time.monotonic() < self._backend_not_before
                ):
                    break
        except Exception:  # (a bug of ours: the events stay in the list)
            logger.exception("resending events kept in memory failed unexpectedly")
            self._fallback.release([s.event.event_id for s in claimed])
            self._resend_pending = True
            failed += 1  # (slows the next pass down)
        finally:
            self._schedule_next_resend(delivered, failed, errors, retry_after)
            self._wake.set()  # (the sender thread reads the next resend time anew)

    def _schedule_next_resend(
        self,
        delivered: int,
        failed: int,
        errors: list[BaseException],
        retry_after: float | None,
    ) -> None:
        """After a resend pass: when the next one may start."""
        now = time.monotonic()
        if retry_after:
            self._backend_not_before = max(self._backend_not_before, now + retry_after)
        if not failed:
            self._resend_wait = FALLBACK_RETRY_SECONDS
            self._resend_at = max(now, self._backend_not_before)
            return
        if delivered:
            self._resend_wait = FALLBACK_RETRY_SECONDS
        else:
            self._resend_wait = min(self._resend_wait * 2, FALLBACK_RETRY_MAX_SECONDS)
        self._resend_at = max(now + self._resend_wait, self._backend_not_before)
        self._resend_log.log(
            logging.WARNING,
            "resending %s kept in memory failed (%s); next try in %.0fs",
            counted(failed, "usage events"),
            errors[0] if errors else "internal error",
            self._resend_at - now,
        )

    def _resend_batch(self, claimed: list[StoredEvent]) -> Outcome[_Item]:
        """One attempt at ``claimed`` (leased from the in-memory list), settled in the
        list: delivered ones removed, failed ones put behind the others (due), refused
        ones kept never due, the others (not tried: out of time) given back."""
        items = [_Item(s.event, s.attempts) for s in claimed]
        self._resending = len(items)
        try:
            outcome = self._attempt(items, stop=self._resend_stopped)
        except BaseException:  # (a bug of ours, or of a custom transport: they stay kept)
            self._fallback.release([s.event.event_id for s in claimed])
            raise
        finally:
            self._resending = 0
        self._stats.add(batches=outcome.batches)
        if outcome.delivered:
            removed = self._fallback.discard([i.event.event_id for i in outcome.delivered])
            self._stats.add(sent=len(outcome.delivered), resent=removed)
            logger.info("resent %s kept in memory", counted(len(outcome.delivered), "usage events"))
        for error, group in outcome.retriable:
            ids = [i.event.event_id for i in group]
            if error is OUT_OF_TIME:  # not tried (close()'s deadline): as they were
                self._fallback.release(ids)
                continue
            self._stats.error(str(error))
            self._stats.add(retried=len(group))
            self._fallback.mark_failed(
                ids, error=str(error), next_attempt_at=time.time(), to_back=True
            )
        for error, group in outcome.final:
            self._stats.error(str(error))
            self._fallback.mark_failed(
                [i.event.event_id for i in group], error=str(error), next_attempt_at=math.inf
            )
            self._failure_log.log(
                logging.ERROR,
                "%s kept in memory refused when resent, kept there (not resent again): %s",
                counted(len(group), "usage events"),
                error,
                key=("resend", _kind(error)),
                events=len(group),
            )
        return outcome

    def _resend_stopped(self) -> bool:
        """close()'s deadline has passed: a resend starts no more requests (lookups
        included), even one that began before close()."""
        deadline = self._close_deadline
        return deadline is not None and time.monotonic() >= deadline


def _kind(error: DeliveryError) -> tuple[str, int | None]:
    """The kind of a delivery failure, for the log throttles: its class and HTTP status
    (a tenant without an account, a rate limit and an outage are throttled apart; "no
    account" answered or cached is one kind)."""
    if isinstance(error, CustomerNotFound):
        return type(error).__name__, None
    return type(error).__name__, error.status
