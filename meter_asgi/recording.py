"""Turning a finished request into usage events: who is billed, how much, and handing
the events to the client.

One :class:`Recorder` per middleware, built once from its options. Every method that
runs on the request path swallows its own failures (logged on the ``meter.asgi`` logger,
rate limited): metering never breaks the host app.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from meter_asgi.resolvers import Resolver
from meter_asgi.types import Scope
from meter_core import (
    MAX_USAGE,
    InvalidEvent,
    LogThrottle,
    MeterClient,
    MeterSpec,
    UsageEvent,
    parse_usage_header,
)

__all__ = ["Recorder", "ResponseHeaders", "logger"]

logger = logging.getLogger("meter.asgi")

COUNTERS = (
    "metered_requests",  # successful requests that produced at least one event
    "events",  # events handed to the client (volume and session)
    "untenanted",  # requests or sessions with usage but no tenant id: not metered
    "unconfigured",  # requests or sessions with usage but no client (not built): not metered
    "invalid",  # usage dropped because an id, a meter or an amount was not valid
    "metered_twice",  # requests a nested MeterMiddleware metered too (billed by both)
    "client_gone",  # successful responses whose client left before they started: unbilled
    "errors",  # internal errors of the middleware (logged and swallowed)
    "sessions_started",
    "sessions_ended",
)


class ResponseHeaders(Mapping[str, str]):
    """The response headers as a read-only, case-insensitive mapping (names lower-cased,
    values of a repeated header joined with ``", "``); what a usage callable receives.
    Built lazily from the raw ASGI header list, only when a callable asks."""

    __slots__ = ("_items", "_raw")

    def __init__(self, raw: Sequence[tuple[bytes, bytes]] | None) -> None:
        self._raw = raw or ()
        self._items: dict[str, str] | None = None

    def _data(self) -> dict[str, str]:
        if self._items is None:
            items: dict[str, str] = {}
            for name, value in self._raw:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                items[key] = f"{items[key]}, {text}" if key in items else text
            self._items = items
        return self._items

    def __getitem__(self, key: str) -> str:
        return self._data()[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._data()


def _left_at_shutdown(client: MeterClient, timeout: float) -> None:
    """Say what a client the app gave still holds in memory once the shutdown flush
    gave up (the backend down or slow): past this point nothing may close it."""
    if client.closed or client.options["durable"]:
        return  # (closed by the app, or each event already in the store)
    waiting = client.stats()["queue_depth"]
    if not waiting:
        return
    where = (
        "close() would hand them to its failure store"
        if client.failure_store is not None
        else "it has no failure store, so close() could only count them"
    )
    logger.error(
        "at lifespan shutdown, %d usage %s still waiting to be sent after %gs "
        "(backend down or slow), in a meter client the app gave and has not closed: they "
        "are lost if the process exits now (uvicorn skips exit hooks on SIGTERM). Close "
        "the client in the app's lifespan (await client.aclose()): %s",
        waiting,
        "event was" if waiting == 1 else "events were",
        timeout,
        where,
    )


class Recorder:
    """Resolves tenant and device, computes amounts, builds and enqueues events.

    ``client`` given: used as is, never closed nor replaced here. ``client`` None: one is
    built from the environment (``MeterClient.from_env()``) at first need and owned (see
    :meth:`close` and :meth:`renew`); if that fails, the error is logged once and nothing
    is metered until the next lifespan startup. Counters (:attr:`counters`) are plain
    ints updated on the event loop.
    """

    def __init__(
        self,
        *,
        client: MeterClient | None,
        tenant: str | None,
        tenant_resolver: Resolver | None,
        device: str | None,
        device_resolver: Resolver | None,
        allow_unknown_meters: bool,
    ) -> None:
        self._client = client
        self.owns_client = client is None
        self._client_failed = False
        self._client_closed = False  # the owned client was closed by close()
        self._lifespan = False  # a lifespan startup came through (renew() ran)
        self._build_lock = threading.Lock()
        self._tenant = tenant
        self._tenant_resolver = tenant_resolver
        self._device = device
        self._device_resolver = device_resolver
        self._allow_unknown = allow_unknown_meters
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._untenanted_log = LogThrottle(logger)
        self._unconfigured_log = LogThrottle(logger)
        self._invalid_log = LogThrottle(logger)
        self._error_log = LogThrottle(logger)
        self._twice_log = LogThrottle(logger)
        self._state_key_warned = False

    # -- the client --------------------------------------------------------------------

    def client(self) -> MeterClient | None:
        """The client, built from the environment at the first call when not given."""
        client = self._client
        if client is not None or self._client_failed:
            return client
        with self._build_lock:
            if self._client is None and not self._client_failed:
                try:
                    overrides: dict[str, Any] = {}
                    if self._allow_unknown:
                        overrides["allow_unknown_meters"] = True
                    self._client = MeterClient.from_env(**overrides)
                except Exception as exc:
                    self._client_failed = True
                    logger.error(
                        "metering is off: the meter client could not be built from the "
                        "environment (METER_* variables): %s",
                        exc,
                    )
                    return None
                if not self._lifespan:
                    logger.warning(
                        "MeterMiddleware got no lifespan startup (the server runs with "
                        "lifespan off, or the middleware is on a mounted app, which gets "
                        "none): nothing closes the client it built at shutdown, and on "
                        "SIGTERM uvicorn skips exit hooks, so events still queued then are "
                        "lost. Pass client= and close it in the app's lifespan, or set "
                        "METER_DURABLE=true"
                    )
                if self._device is None and self._client.device_id is None:
                    logger.error(
                        "no device id: set METER_DEVICE_ID or pass device= to "
                        "MeterMiddleware; requests without one are not metered"
                    )
            return self._client

    def renew(self) -> None:
        """At a lifespan startup: forget an owned client that :meth:`close` closed, or
        that could not be built, so that the next :meth:`client` call builds one from the
        environment as it is now (an app object served again, e.g. one test client or
        server per test). A given client, or an owned one still open, is kept."""
        self._lifespan = True
        if not self.owns_client:
            return
        with self._build_lock:
            if self._client_closed or self._client_failed:
                self._client = None
                self._client_closed = False
                self._client_failed = False

    async def shutdown(self, timeout: float) -> None:
        """At lifespan shutdown: flush and close the client if this recorder built it;
        flush (for up to ``timeout`` seconds, not close) a client the app gave, whose
        closing is the app's. Runs in a worker thread so the event loop keeps serving
        while it waits. A closed owned client stays in use (events recorded later go to
        its failure store) until :meth:`renew`."""
        client = self._client
        if client is None:
            return
        try:
            if self.owns_client:
                self._client_closed = True
                await asyncio.to_thread(client.close, timeout)
            else:
                # uvicorn ends on SIGTERM without running atexit: send what can be sent
                # now, or it would be lost with the process
                if not await asyncio.to_thread(client.flush, timeout):
                    _left_at_shutdown(client, timeout)
        except Exception as exc:
            self.internal_error("closing the meter client", exc)

    # -- who is billed -----------------------------------------------------------------

    def who(
        self, scope: Scope, method: str, path: str, client: MeterClient
    ) -> tuple[str, str] | None:
        """``(tenant_id, device_id)`` for this request (the device defaults to the
        client's), or None when it must not be metered: no tenant (counted as
        ``untenanted`` and logged, rate limited), no device id anywhere (counted as
        ``unconfigured``, logged, rate limited) or a resolver failed (logged)."""
        tenant = self._tenant
        try:
            if tenant is None and self._tenant_resolver is not None:
                tenant = self._tenant_resolver(scope)
            device = self._device
            if device is None and self._device_resolver is not None:
                device = self._device_resolver(scope) or None
        except Exception as exc:
            self.counters["invalid"] += 1
            self._invalid_log.log(logging.WARNING, "%s %s not metered: %s", method, path, exc)
            return None
        if not tenant:
            self.counters["untenanted"] += 1
            reason = "no tenant id for the request"
            explain = getattr(self._tenant_resolver, "explain", None)
            if callable(explain):
                reason = f"{reason} ({explain(scope)})"
            self._untenanted_log.log(logging.WARNING, "%s %s not metered: %s", method, path, reason)
            return None
        if device is None:
            device = client.device_id
            if device is None:
                self.counters["unconfigured"] += 1
                self._unconfigured_log.log(
                    logging.WARNING,
                    "%s %s not metered: no device id (set METER_DEVICE_ID or pass device= "
                    "to MeterMiddleware)",
                    method,
                    path,
                )
                return None
        return tenant, device

    # -- how much ----------------------------------------------------------------------

    def amount(
        self,
        spec: MeterSpec,
        scope: Scope,
        status: int,
        raw_headers: Sequence[tuple[bytes, bytes]] | None,
        header_usage: Mapping[str, str] | None,
    ) -> int:
        """The usage of ``spec`` for this response; 0 means nothing to record (also
        when the amount is not valid: that is counted as ``invalid`` and logged, rate
        limited, and only this meter is dropped)."""
        if spec.header is not None:
            raw = header_usage.get(spec.header) if header_usage else None
            if raw is None:
                return 0
            try:
                return parse_usage_header(spec.header, raw)
            except InvalidEvent as exc:
                self._invalid(f"usage of {spec.meter_id!r} not recorded: {exc}")
                return 0
        usage = spec.usage
        if type(usage) is int:
            return usage
        try:
            value = usage(scope, status, ResponseHeaders(raw_headers))  # type: ignore[operator]
        except Exception as exc:
            self.internal_error(f"usage callable of {spec.meter_id!r}", exc)
            return 0
        if value is None:
            return 0
        if type(value) is not int or not 0 <= value <= MAX_USAGE:
            self._invalid(
                f"usage callable of {spec.meter_id!r} returned {value!r}, "
                f"not an int from 0 to {MAX_USAGE}"
            )
            return 0
        return value

    # -- handing events over -----------------------------------------------------------

    def submit_nowait(self, client: MeterClient, events: Sequence[UsageEvent]) -> None:
        """Enqueue ``events`` on a client that is not durable: appends to its queue, no
        I/O, no await (the request path of every metered request). Never raises: a
        failure is logged."""
        counters = self.counters
        try:
            for event in events:
                client.enqueue(event)
                counters["events"] += 1
        except Exception as exc:
            self.internal_error("enqueueing a usage event", exc)

    async def submit(self, client: MeterClient, events: Sequence[UsageEvent]) -> None:
        """Enqueue ``events`` on any client (no network I/O). When that writes to the
        store (durable mode, a full queue, a closed client), all of them are written in
        one call in a worker thread: a cancellation of the request (a timeout middleware,
        a client gone) cannot leave part of its usage recorded. Never raises: a failure
        is logged."""
        try:
            # the response is sent: a store that fails keeps them in memory until it works
            await client.aenqueue_many(events, hold_on_store_error=True)
        except asyncio.CancelledError:
            self.counters["events"] += len(events)  # (the write goes on in its thread)
            raise
        except Exception as exc:
            self.internal_error("enqueueing a usage event", exc)
        else:
            self.counters["events"] += len(events)

    def metered_twice(self, method: str, path: str) -> None:
        """A MeterMiddleware nested in this one (on a mounted app, or the middleware
        added twice) metered the request too: both record it, each by its own rules.
        Billing intent cannot be told from here, so it is counted and logged (rate
        limited), not undone."""
        self.counters["metered_twice"] += 1
        self._twice_log.log(
            logging.WARNING,
            "%s %s was metered by two MeterMiddleware (one nested in the other: on a mounted "
            "app, or added twice); both billed it. Keep one, or give them rules for "
            "different routes",
            method,
            path,
        )

    def state_key_taken(self, held: object) -> None:
        """``scope["state"]["meter"]`` holds the app's own object: warn once."""
        if not self._state_key_warned:
            self._state_key_warned = True
            logger.warning(
                "request.state.meter holds the app's own %s (lifespan state?), so it is "
                "left alone: handlers reach the request's usage with Depends(meter_usage)",
                type(held).__name__,
            )

    def invalid_event(self, what: str, exc: InvalidEvent) -> None:
        """Usage that could not become a valid event (bad tenant id, unknown meter...)."""
        self._invalid(f"{what} not metered: {exc}")

    def _invalid(self, message: str) -> None:
        self.counters["invalid"] += 1
        self._invalid_log.log(logging.WARNING, "%s", message)

    def internal_error(self, where: str, exc: BaseException) -> None:
        """Log an internal failure (rate limited: the line logged carries the traceback,
        the ones held back go to debug level); never raises."""
        self.counters["errors"] += 1
        try:
            logged = self._error_log.log(
                logging.ERROR,
                "metering error in %s: %s: %s",
                where,
                type(exc).__name__,
                exc,
                exc_info=exc,
                key=(where, type(exc)),  # (one failure does not hide another)
            )
            if not logged:
                logger.debug("metering error in %s", where, exc_info=exc)
        except Exception:  # pragma: no cover - a broken handler must not break the app
            pass
