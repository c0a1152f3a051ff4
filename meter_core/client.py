"""MeterClient: validate usage events, then deliver them (in the background or at once).

Two ways to send:

- ``record()`` / ``record_session()`` / ``arecord()``: validate now, enqueue, return the
  ``event_id``. No network I/O and no lock held across I/O on the caller's path. A
  background sender (one per client per process, started lazily, started again in a
  forked child) batches, retries and stores what cannot be delivered.
- ``send()`` / ``send_session()``: one event, synchronously; returns the proxy's JSON or
  raises a :class:`~meter_core.DeliveryError` subclass.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meter_core import capture
from meter_core.config import CLIENT_OPTIONS, Secret, coerce_option, options_from_env, redact_url
from meter_core.customers import CustomerCache
from meter_core.errors import ConfigurationError, InvalidEvent
from meter_core.events import UsageEvent
from meter_core.retry import RetryPolicy
from meter_core.sender import Sender, SenderConfig
from meter_core.spool import SQLiteSpool
from meter_core.stats import DeliveryStats
from meter_core.store import FailureStore, MemoryFailureStore, StoredEvent
from meter_core.store_writes import StoreWrites
from meter_core.transport import HTTPTransport, LogTransport, MemoryTransport, Transport

__all__ = ["MeterClient"]

logger = logging.getLogger("meter.client")

BeforeSend = Callable[[UsageEvent], "UsageEvent | None"]
OnError = Callable[[Sequence[UsageEvent], BaseException], None]

_clients: weakref.WeakSet[MeterClient] = weakref.WeakSet()
# Senders of this process; a running sender is held by its thread, so it stays here
# until it stops even when its client is gone.
_senders: weakref.WeakSet[Sender] = weakref.WeakSet()
_FORK_HOOK = hasattr(os, "register_at_fork")


class MeterClient:
    """A client of the Litewave metering backend.

    Every option is checked here: a missing or malformed URL, a wrong type or an out of
    range number raises :class:`~meter_core.ConfigurationError` at once. Nothing touches
    the network or the disk until the first event. The API key is kept wrapped and never
    appears in a repr, a log line or an error message.

    ``transport`` is ``"http"`` (default; needs ``kafka_url``), ``"memory"``, ``"log"``,
    or any :class:`~meter_core.Transport`. ``enabled=False`` validates and captures
    events, then discards them; it needs no ``kafka_url``.
    """

    def __init__(
        self,
        kafka_url: str | None = None,
        portal_url: str | None = None,
        api_key: str | Secret | None = None,
        *,
        internal_url: str = "http://metering.metering.svc.cluster.local:8000",
        topic: str = "usage-events",
        device_id: str | None = None,
        timeout: float = 10.0,
        customer_cache_ttl: float = 300.0,
        negative_cache_ttl: float = 30.0,
        allow_unknown_meters: bool = False,
        batch_size: int = 500,
        max_batch_bytes: int = 1024 * 1024,
        flush_interval: float = 0.5,
        max_queue: int = 100_000,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        durable: bool = False,
        spool_path: str | None = None,
        transport: str | Transport = "http",
        max_failed_in_memory: int = 10_000,
        enabled: bool = True,
        failure_store: FailureStore | None = None,
        before_send: BeforeSend | None = None,
        on_error: OnError | None = None,
    ) -> None:
        secret = coerce_option(CLIENT_OPTIONS["api_key"], api_key)
        del api_key  # from here on only the wrapped Secret exists in this frame
        raw = dict(locals())
        del raw["self"], raw["secret"]
        raw["api_key"] = secret
        opts: dict[str, Any] = {}
        for name, value in raw.items():
            option = CLIENT_OPTIONS[name]
            if name == "kafka_url" and value is None:
                opts[name] = None
                continue
            opts[name] = coerce_option(option, value)
        if opts["device_id"] is not None:
            opts["device_id"] = _checked_id("device_id", opts["device_id"])
        self._options = opts
        self._api_key: Secret | None = opts["api_key"]
        self.device_id: str | None = opts["device_id"]
        self.enabled: bool = opts["enabled"]
        self.allow_unknown_meters: bool = opts["allow_unknown_meters"]
        self._transport = self._make_transport(opts)
        store = opts["failure_store"]
        if store is None and opts["spool_path"]:
            # (bound to the topic: clients of other topics may share the file)
            store = SQLiteSpool(opts["spool_path"], topic=opts["topic"])
        elif isinstance(store, SQLiteSpool):
            if store.topic is None:  # bound to this client's topic, as the spool_path one
                store.topic = opts["topic"]
            elif store.topic != opts["topic"]:
                raise ConfigurationError(
                    f"failure_store: the spool keeps events of topic {store.topic!r}, and "
                    f"this client sends to {opts['topic']!r} (a spool given to clients of "
                    "two topics: give each its own SQLiteSpool of the file)"
                )
        if store is not None and not isinstance(store, FailureStore):
            raise ConfigurationError(
                f"failure_store: must implement meter_core.FailureStore, got {store!r}"
            )
        if opts["durable"] and store is None:
            raise ConfigurationError(
                "durable: needs a failure store (failure_store=SQLiteSpool(path) or spool_path)"
            )
        self.failure_store: FailureStore | None = store
        for hook in ("before_send", "on_error"):
            if opts[hook] is not None and not callable(opts[hook]):
                raise ConfigurationError(f"{hook}: must be callable, got {opts[hook]!r}")
        self._before_send: BeforeSend | None = opts["before_send"]
        self._on_error: OnError | None = opts["on_error"]
        if opts["backoff_cap"] < opts["backoff_base"]:
            raise ConfigurationError(
                f"backoff_cap: must be >= backoff_base ({opts['backoff_base']:g}), "
                f"got {opts['backoff_cap']:g}"
            )
        self.retry_policy = RetryPolicy(
            max_retries=opts["max_retries"],
            backoff_base=opts["backoff_base"],
            backoff_cap=opts["backoff_cap"],
        )
        self._sender_config = SenderConfig(
            batch_size=opts["batch_size"],
            max_batch_bytes=opts["max_batch_bytes"],
            flush_interval=opts["flush_interval"],
            max_queue=opts["max_queue"],
            durable=opts["durable"],
            # An attempt starts no request after attempt_seconds; one request may then
            # take up to 3 tries (urllib3's retries) of up to 2 timeouts each (connect,
            # then read). The lease outlasts that, so no other worker claims the events
            # while this one may still deliver them.
            attempt_seconds=3 * opts["timeout"],
            lease_seconds=9 * opts["timeout"] + 5,
        )
        self._lock = threading.Lock()
        self._reset_process_state()
        _clients.add(self)
        _register_process_hooks()

    def _reset_process_state(self) -> None:
        """Fresh per-process parts: the cache, the stats and the sender (made lazily)."""
        self._lock = threading.Lock()
        self._customers = CustomerCache(
            self._transport.lookup_customer,
            ttl=self._options["customer_cache_ttl"],
            negative_ttl=self._options["negative_cache_ttl"],
            failure_backoff=self._lookup_backoff,
        )
        self._stats = DeliveryStats()
        self._fallback = MemoryFailureStore(self._options["max_failed_in_memory"])
        self._sender: Sender | None = None
        self._writes = StoreWrites()  # store writes handed off by async callers
        self._closed = False

    def _lookup_backoff(self, failures: int) -> float:
        """Seconds before a tenant whose lookup failed ``failures`` times in a row is
        looked up again: none after one or two (a blip must not use up the retries of
        its events without a lookup), then half the ceiling of the retry delay (its
        mean, with full jitter), so that the sender's retries of many small groups of
        events do not each look the tenant up while the lookup API fails."""
        if failures <= _FREE_LOOKUP_FAILURES:
            return 0.0
        base: float = self._options["backoff_base"]
        cap: float = self._options["backoff_cap"]
        return min(cap, base * 2.0 ** min(62, failures - _FREE_LOOKUP_FAILURES - 1)) / 2

    @staticmethod
    def _make_transport(opts: Mapping[str, Any]) -> Transport:
        transport = opts["transport"]
        if not isinstance(transport, str):
            if not isinstance(transport, Transport):
                raise ConfigurationError(
                    f"transport: must be 'http', 'memory', 'log' or a Transport, got {transport!r}"
                )
            return transport
        if transport == "memory":
            return MemoryTransport()
        if transport == "log":
            return LogTransport()
        if transport != "http":
            raise ConfigurationError(
                f"transport: must be 'http', 'memory', 'log' or a Transport, got {transport!r}"
            )
        if opts["kafka_url"] is None and not opts["enabled"]:
            return MemoryTransport()  # a disabled client sends nothing: no backend URL needed
        if opts["kafka_url"] is None:
            raise ConfigurationError(
                "kafka_url: is required (the Kafka REST Proxy base URL; env METER_KAFKA_URL)"
            )
        if bool(opts["portal_url"]) != bool(opts["api_key"]):
            # One of the pair is set, most likely by mistake (a variable missing on one
            # host): say where lookups go, since that is not what was asked for.
            given, missing = ("portal_url", "api_key") if opts["portal_url"] else (
                "api_key", "portal_url")  # fmt: skip
            logger.warning(
                "%s is set but %s is not: customer lookups go to the in-cluster service "
                "(internal_url %s), not to the portal; set both for the external lookup",
                given,
                missing,
                redact_url(opts["internal_url"]),
            )
        return HTTPTransport(
            opts["kafka_url"],
            opts["portal_url"],
            opts["api_key"],
            internal_url=opts["internal_url"],
            topic=opts["topic"],
            timeout=opts["timeout"],
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MeterClient:
        """A client configured from ``METER_*`` environment variables (see
        :data:`~meter_core.CLIENT_OPTIONS` for the names); keyword arguments win."""
        if "api_key" in overrides:  # wrapped first: no frame holds the bare key past here
            overrides["api_key"] = coerce_option(CLIENT_OPTIONS["api_key"], overrides["api_key"])
        options = options_from_env(os.environ if environ is None else environ)
        options.update(overrides)
        return cls(**options)

    def __repr__(self) -> str:
        options = getattr(self, "_options", None)  # also during a failed __init__
        if options is None:
            return "MeterClient(<not configured>)"
        kafka = options["kafka_url"]
        transport = type(getattr(self, "_transport", None)).__name__
        return (
            f"MeterClient(kafka_url={redact_url(kafka) if kafka else None!r}, "
            f"transport={transport}, topic={options['topic']!r})"
        )

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def customer_cache(self) -> CustomerCache:
        """This process's tenant -> customer id cache."""
        return self._customers

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or :meth:`aclose`) has been called."""
        return self._closed

    @property
    def options(self) -> dict[str, Any]:
        """The validated options (the API key as a redacting :class:`Secret`)."""
        return dict(self._options)

    # -- building events ---------------------------------------------------------------

    def _device(self, device_id: str | None) -> str:
        if device_id is None:
            device_id = self.device_id
            if device_id is None:
                raise InvalidEvent(
                    "device_id", "is required (pass it, or set the client's device_id)"
                )
        return device_id

    def event(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        total_usage: int,
        device_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timestamp: int | None = None,
    ) -> UsageEvent:
        """A validated volume/performance event (not sent). Raises InvalidEvent."""
        return UsageEvent(
            tenant_id, self._device(device_id), meter_id, total_usage, timestamp, metadata,
            allow_unknown_meter=self.allow_unknown_meters,
        )  # fmt: skip

    def session_event(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        device_id: str | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> UsageEvent:
        """A validated AI session boundary event (not sent); exactly one of
        ``start_time`` / ``end_time``. Raises InvalidEvent."""
        if start_time is None and end_time is None:
            raise InvalidEvent("start_time", "a session event needs start_time or end_time")
        return UsageEvent(
            tenant_id, self._device(device_id), meter_id, None,
            metadata=metadata, start_time=start_time, end_time=end_time,
            allow_unknown_meter=self.allow_unknown_meters,
        )  # fmt: skip

    # -- background delivery -----------------------------------------------------------

    def record(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        total_usage: int,
        device_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timestamp: int | None = None,
    ) -> str:
        """Validate a usage event and hand it to the background sender; returns its
        ``event_id``. Raises InvalidEvent for bad input, at once. Does no network I/O;
        in durable mode the event is in the store when this returns."""
        event = self.event(
            tenant_id=tenant_id, meter_id=meter_id, total_usage=total_usage,
            device_id=device_id, metadata=metadata, timestamp=timestamp,
        )  # fmt: skip
        self.enqueue(event)
        return event.event_id

    def record_session(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        device_id: str | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Like :meth:`record`, for an AI session start or end event."""
        event = self.session_event(
            tenant_id=tenant_id, meter_id=meter_id, device_id=device_id,
            start_time=start_time, end_time=end_time, metadata=metadata,
        )  # fmt: skip
        self.enqueue(event)
        return event.event_id

    def enqueue(self, event: UsageEvent) -> None:
        """Hand an already built event to the background sender (see :meth:`record`)."""
        if capture._active or self._before_send is not None:
            hooked = self._hooked(event)
            if hooked is None:
                return
            event = hooked
        if not self.enabled:
            logger.debug("metering disabled: event %s not sent", event.event_id)
            return
        sender = self._sender
        # (a forked child gets a new sender from the fork hook; the pid check is for
        # platforms without one)
        if sender is None or (not _FORK_HOOK and sender.pid != os.getpid()):
            sender = self._get_sender()
        sender.enqueue(event)

    def enqueue_many(
        self, events: Sequence[UsageEvent], *, hold_on_store_error: bool = False
    ) -> None:
        """:meth:`enqueue` for the events of one unit of work (say, one request): in
        durable mode they are written to the store in one transaction, all or none.

        ``hold_on_store_error``: for a caller that can neither report nor retry a
        StoreError (an adapter whose response is already sent): when the durable write
        fails, the events are queued in memory and sent as in default mode (what fails
        then is stored, or kept in memory while the store still fails), rather than
        raised about and lost."""
        kept = [e for e in map(self._hooked, events) if e is not None]
        if not self.enabled:
            logger.debug("metering disabled: %d events not sent", len(kept))
            return
        if kept:
            self._current_sender().enqueue_many(kept, hold=hold_on_store_error)

    def enqueue_blocks(self, count: int = 1) -> bool:
        """Whether enqueueing ``count`` events now would write to the failure store (a
        local disk or database write, which can wait on a lock) rather than only append
        to the queue: in durable mode, once closed, or when the queue has no room for
        them and the store takes the overflow. Async code then runs the enqueue in a
        worker thread (:meth:`aenqueue` and :meth:`aenqueue_many` do)."""
        if not self.enabled:
            return False
        sender = self._sender
        if sender is None or sender.pid != os.getpid():
            config = self._sender_config
            return (
                config.durable
                or self._closed
                or (self.failure_store is not None and count > config.max_queue)
            )
        return sender.enqueue_blocks(count)

    def _current_sender(self) -> Sender:
        sender = self._sender
        # (a forked child gets a new sender from the fork hook; the pid check is for
        # platforms without one)
        if sender is None or (not _FORK_HOOK and sender.pid != os.getpid()):
            sender = self._get_sender()
        return sender

    def _hooked(self, event: UsageEvent) -> UsageEvent | None:
        """``event`` once passed through the ``before_send`` hook (None: the hook dropped
        it) and, as the hook left it, seen by :func:`capture_events`: a test captures
        what would be sent, not what the hook then changed or dropped."""
        if self._before_send is not None:
            hooked = self._apply_before_send(event)
            if hooked is None:
                return None
            event = hooked
        if capture._active:
            capture.notify(event)
        return event

    def _apply_before_send(self, event: UsageEvent) -> UsageEvent | None:
        assert self._before_send is not None
        try:
            result = self._before_send(event)
        except Exception:
            logger.exception("before_send hook raised; the event is kept unchanged")
            return event
        if result is None:
            if self.enabled:  # (a disabled client counts nothing it is given)
                self._stats.add(recorded=1, dropped=1)
            logger.info("before_send dropped event %s", event.event_id)
            return None
        if isinstance(result, UsageEvent):
            return result
        logger.error("before_send returned %r, not a UsageEvent; event kept", result)  # type: ignore[unreachable]
        return event

    def _get_sender(self) -> Sender:
        with self._lock:
            if self._sender is None or self._sender.pid != os.getpid():
                self._sender = Sender(
                    transport=self._transport,
                    customers=self._customers,
                    policy=self.retry_policy,
                    config=self._sender_config,
                    store=self.failure_store,
                    fallback=self._fallback,
                    stats=self._stats,
                    on_error=self._on_error,
                )
                _senders.add(self._sender)
                _register_pool_worker_exit()
            return self._sender

    async def arecord(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        total_usage: int,
        device_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timestamp: int | None = None,
    ) -> str:
        """:meth:`record` for async code. The enqueue never blocks the event loop; in
        durable mode the store write runs in a worker thread."""
        event = self.event(
            tenant_id=tenant_id, meter_id=meter_id, total_usage=total_usage,
            device_id=device_id, metadata=metadata, timestamp=timestamp,
        )  # fmt: skip
        await self.aenqueue(event)
        return event.event_id

    async def arecord_session(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        device_id: str | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """:meth:`record_session` for async code (see :meth:`arecord`)."""
        event = self.session_event(
            tenant_id=tenant_id, meter_id=meter_id, device_id=device_id,
            start_time=start_time, end_time=end_time, metadata=metadata,
        )  # fmt: skip
        await self.aenqueue(event)
        return event.event_id

    async def aenqueue(self, event: UsageEvent) -> None:
        """:meth:`enqueue` for async code: a store write (:meth:`enqueue_blocks`) runs in
        a worker thread, so the event loop never waits on it, and completes even if the
        awaiting task is cancelled."""
        if self.enqueue_blocks():
            await self._writes.run(self.enqueue, event)
        else:
            self.enqueue(event)

    async def aenqueue_many(
        self, events: Sequence[UsageEvent], *, hold_on_store_error: bool = False
    ) -> None:
        """:meth:`enqueue_many` for async code. A store write runs in a worker thread as
        one call, which completes even if the awaiting task is cancelled."""
        if self.enqueue_blocks(len(events)):
            write = functools.partial(self.enqueue_many, hold_on_store_error=hold_on_store_error)
            await self._writes.run(write, events)
        else:
            self.enqueue_many(events, hold_on_store_error=hold_on_store_error)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Send everything waiting now; True when nothing is left pending in memory within
        ``timeout`` seconds (events that failed for good count as done: they are stored).
        Store writes that async callers handed off (:meth:`aenqueue`) are waited for
        first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._writes.wait(timeout):
            return False
        sender = self._sender
        if sender is None or sender.pid != os.getpid():
            return True
        return sender.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def wake(self) -> None:
        """Ask the background sender to look for work now, without waiting, rather than
        at its next poll (``flush_interval``): say, for durable events just committed that
        must go out at once. The adapters do not call it per event: batching is cheaper."""
        sender = self._sender
        if sender is not None and sender.pid == os.getpid():
            sender.wake()

    async def aflush(self, timeout: float | None = 10.0) -> bool:
        """:meth:`flush` without blocking the event loop."""
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float | None = 5.0) -> None:
        """:meth:`close` without blocking the event loop (for an app's lifespan)."""
        await asyncio.to_thread(self.close, timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Flush for up to ``timeout`` seconds, then store whatever is still undelivered
        and stop the sender. With a failure store, events waiting for a retry (the backend
        is failing) are handed to it at once rather than waited for (without one, or when
        it refuses them, the wait is their only chance). Safe from any thread and more
        than once; called at exit.
        Events recorded after close go straight to the failure store. In durable mode it
        waits for this process's events in memory only: those in the store stay there for
        any process sharing it (or the next start) to send. Store writes that async
        callers handed off are waited for first (within the same ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._writes.wait(timeout):
            logger.error("close(): store writes handed off by async code still running")
        with self._lock:
            self._closed = True
            sender = self._sender
        if sender is not None and sender.pid == os.getpid():
            sender.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if sender is None:
            self._get_sender().close(0)

    def stats(self) -> dict[str, Any]:
        """Counters (see :class:`~meter_core.stats.DeliveryStats`) plus ``queue_depth``
        (events waiting in memory) and ``failed_in_memory`` (the in-memory failure list)."""
        sender = self._sender
        data = self._stats.snapshot(sender.queued if sender is not None else None)
        data["queue_depth"] = sender.depth() if sender is not None else 0
        data["failed_in_memory"] = len(self._fallback)
        return data

    def failed_events(self) -> list[StoredEvent]:
        """Events kept in the in-memory failure list (used when no failure store is set)."""
        return self._fallback.events()

    # -- synchronous delivery ----------------------------------------------------------

    def send(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        total_usage: int,
        device_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timestamp: int | None = None,
    ) -> dict[str, Any]:
        """Post one event now and return the proxy's JSON answer.

        Raises InvalidEvent for bad input; CustomerNotFound, DeliveryRejected,
        BackendUnavailable or RateLimited when the backend does not take it (also when
        the proxy answers 200 but reports an error for the record).
        """
        event = self.event(
            tenant_id=tenant_id, meter_id=meter_id, total_usage=total_usage,
            device_id=device_id, metadata=metadata, timestamp=timestamp,
        )  # fmt: skip
        return self.send_event(event)

    def send_session(
        self,
        *,
        tenant_id: str,
        meter_id: str,
        device_id: str | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Like :meth:`send`, for an AI session start or end event."""
        event = self.session_event(
            tenant_id=tenant_id, meter_id=meter_id, device_id=device_id,
            start_time=start_time, end_time=end_time, metadata=metadata,
        )  # fmt: skip
        return self.send_event(event)

    def send_event(self, event: UsageEvent) -> dict[str, Any]:
        """Post one built event now (see :meth:`send`)."""
        if capture._active:
            capture.notify(event)
        if not self.enabled:
            return {"offsets": [], "disabled": True}
        customer = self._customers.get(event.tenant_id)
        record = {"key": customer, "value": event.record_value(customer)}
        result = self._transport.produce([record])
        outcome = result.records[0]
        if not outcome.ok:
            raise outcome.as_error()
        return result.body

    def lookup_customer(self, tenant_id: str) -> Any:
        """The customer id of a tenant, through the cache (does network I/O on a miss)."""
        return self._customers.get(tenant_id)

    def _after_fork_in_child(self) -> None:
        # The parent's queue, sender thread and locks are not ours: start clean.
        self._reset_process_state()


def _checked_id(name: str, value: str) -> str:
    from meter_core.events import validate_identifier

    try:
        return validate_identifier(name, value)
    except InvalidEvent as exc:
        raise ConfigurationError(str(exc)) from None


_hooks_registered = False
_hooks_lock = threading.Lock()


def _register_process_hooks() -> None:
    global _hooks_registered
    with _hooks_lock:
        if _hooks_registered:
            return
        _hooks_registered = True
    atexit.register(_close_all_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_reset_all_after_fork)


_pool_exit_pid = 0


def _register_pool_worker_exit() -> None:
    """In a process started by multiprocessing (or celery's billiard), also close the
    clients when that process's worker code ends: such a child leaves through
    ``os._exit``, which skips ``atexit``, so its queue would be lost. Their finalizers
    run at that exit; once per process (the registry is cleared when a child starts)."""
    global _pool_exit_pid
    if _pool_exit_pid == os.getpid():
        return
    _pool_exit_pid = os.getpid()
    for name in ("multiprocessing.util", "billiard.util"):
        module = sys.modules.get(name)
        if module is not None:
            try:
                module.Finalize(None, _close_all_at_exit, exitpriority=10)
            except Exception:  # an unexpected version: atexit still covers normal exits
                logger.debug("could not register with %s", name, exc_info=True)


# Failed lookups of a tenant in a row that are not backed off (see _lookup_backoff).
_FREE_LOOKUP_FAILURES = 2

#: Seconds a client's close() takes at most at process exit: its last chance to deliver
#: what it holds in memory...
EXIT_TIMEOUT = 5.0
#: ...or, with a failure store to keep it, only a moment for a send on the wire: the rest
#: is stored and resent later under the same event ids. A slow or failing backend must
#: not hold up a worker's exit (gunicorn starts its replacement only then: workers
#: recycled together during an outage stopped the service for as long).
EXIT_TIMEOUT_WITH_STORE = 1.5


def _exit_timeout(store: object) -> float:
    if store is None or isinstance(store, MemoryFailureStore):
        return EXIT_TIMEOUT
    return EXIT_TIMEOUT_WITH_STORE


def _close_all_at_exit() -> None:
    for client in list(_clients):
        try:
            client.close(timeout=_exit_timeout(client.failure_store))
        except Exception:
            logger.exception("closing the meter client at exit failed")
    # A client nothing refers to any more is gone, but its sender thread (which holds
    # its sender) may still have events: close those senders too.
    for sender in list(_senders):
        if sender.pid == os.getpid():
            try:
                sender.close(timeout=_exit_timeout(sender.failure_store))
                sender.release_at_exit()
            except Exception:
                logger.exception("closing a meter sender at exit failed")


def _reset_all_after_fork() -> None:
    for client in list(_clients):
        client._after_fork_in_child()
