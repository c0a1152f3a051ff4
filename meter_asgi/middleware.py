"""MeterMiddleware: pure ASGI middleware that turns each successful call of a metered
route into usage events.

::

    app.add_middleware(
        MeterMiddleware,
        client=MeterClient.from_env(),
        routes={
            "POST /documents/{doc_id}/scan": "page.processed.basic",
            "GET /reports/{kind}": {"meter": "report.generated.small", "header": "x-meter-usage"},
            "WEBSOCKET /ws/chat": {"meter": "chat.on.time_hours", "session": True},
        },
        tenant=from_user("tenant_id"),
    )

It observes the response by wrapping ``send`` (it reads ``http.response.start`` and
never touches the body), so streaming responses, background tasks, websockets and
lifespan pass through. Events are built and enqueued after the app has finished with the
request, and only when it finished without an exception and with a success status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine, Iterable, Sequence
from typing import Any

from meter_asgi.disconnect import client_gone
from meter_asgi.recording import Recorder, logger
from meter_asgi.resolvers import compile_resolver, from_user
from meter_asgi.routes import RouteMatcher, compile_routes
from meter_asgi.rule_check import unmatched_rules
from meter_asgi.sessions import OpenSessions, run_session
from meter_asgi.types import ASGIApp, Message, Receive, Scope, Send
from meter_core import (
    METHODS_WITHOUT_RESULT,
    ConfigurationError,
    InvalidEvent,
    MeterClient,
    MeterSpec,
    RequestUsage,
    UsageEvent,
)

__all__ = ["STATE_KEY", "USAGE_KEY", "MeterMiddleware"]

STATE_KEY = "meter"
"""The key of the request's :class:`~meter_core.RequestUsage` in ``scope["state"]``
(``request.state.meter`` in Starlette and FastAPI), unless the app already keeps
something else under it (lifespan state named ``meter``): then it is left alone, and the
usage is reached through ``Depends(meter_usage)`` or :data:`USAGE_KEY`."""

USAGE_KEY = "meter.usage"
"""The key of the request's :class:`~meter_core.RequestUsage` in ``scope["state"]``
that is always set (what :func:`~meter_asgi.meter_usage` reads)."""

# The middleware that last recorded events for the request, in ``scope["state"]``: a
# second one on the same request (nested apps) finds it there.
_METERED_BY = "meter.metered_by"

# Messages that end a response when they carry no more_body (pathsend always does).
_FINAL_KINDS = frozenset(
    {"http.response.body", "http.response.zerocopysend", "http.response.pathsend"}
)

_DEFAULT_TENANT = from_user("tenant_id")


class MeterMiddleware:
    """Records usage events for the successful requests of metered routes.

    Options (keyword-only, all checked here; a bad one raises
    :class:`~meter_core.ConfigurationError`):

    - ``client``: the :class:`~meter_core.MeterClient` to record with (flushed at
      lifespan shutdown, never closed nor replaced by the middleware: close it in the
      app's lifespan, ``await client.aclose()``). ``None``: one is built from the
      environment with ``MeterClient.from_env()`` at first need, owned by the
      middleware, flushed and closed at lifespan shutdown (and at process exit by the
      client itself, which SIGTERM under uvicorn skips: without lifespan events, a
      warning is logged when it is built). A later lifespan startup of the same app
      (served again, e.g. one test client per test) builds a new one from the
      environment as it is then.
    - ``routes``: ``{"POST /documents/{doc_id}/scan": "page.processed.basic", ...}``
      (see :mod:`meter_asgi.routes`), or a :class:`~meter_core.RouteRules`.
    - ``tenant`` / ``device``: a constant id, a callable ``(scope) -> str | None`` or a
      resolver (:func:`from_user`, :func:`from_state`, :func:`from_path_param`,
      :func:`from_header`). They run after the app has handled the request. ``tenant``
      defaults to ``from_user("tenant_id")``; ``device`` to the client's ``device_id``
      (``METER_DEVICE_ID``). With neither, an error is logged here and requests are not
      metered (counted as ``unconfigured``): the app keeps serving.
    - ``success_statuses``: statuses that are metered (default ``range(200, 300)``).
    - ``allow_unknown_meters``: accept meter ids outside the catalog (default: the
      client's setting).
    - ``close_timeout``: seconds to flush the client at shutdown (default 5).

    Guarantees: a response that is not a success, or a request whose app raised, records
    nothing. Handlers add usage through ``request.state.meter`` (a
    :class:`~meter_core.RequestUsage`, also given by ``Depends(meter_usage)``). Recording
    does no network I/O on the request path. An internal failure is logged on the
    ``meter.asgi`` logger and swallowed; a request without a tenant, or one that comes
    while there is no client, is not metered and is counted (:attr:`stats`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: MeterClient | None = None,
        routes: Any = None,
        tenant: Any = None,
        device: Any = None,
        success_statuses: Iterable[int] = range(200, 300),
        allow_unknown_meters: bool | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        if client is not None and not isinstance(client, MeterClient):
            raise ConfigurationError(f"client: must be a MeterClient or None, got {client!r}")
        if allow_unknown_meters is None:
            allow_unknown_meters = client.allow_unknown_meters if client is not None else False
        elif not isinstance(allow_unknown_meters, bool):
            raise ConfigurationError(
                f"allow_unknown_meters: must be a bool, got {allow_unknown_meters!r}"
            )
        if allow_unknown_meters and client is not None and not client.allow_unknown_meters:
            raise ConfigurationError(
                "allow_unknown_meters: the client refuses unknown meters; build it with "
                "allow_unknown_meters=True too (or register_meter() the extra meters)"
            )
        self.app = app
        self._rules = compile_routes(routes, allow_unknown_meters=allow_unknown_meters)
        self._matcher = RouteMatcher(self._rules)
        self._has_rules = bool(self._rules)
        self._has_sessions = self._rules.has_sessions
        self._strip = frozenset(name.encode("latin-1") for name in self._rules.header_names)
        self._success = _statuses(success_statuses)
        self._allow_unknown = allow_unknown_meters
        tenant_id, tenant_resolver = compile_resolver("tenant", tenant)
        if tenant_id is None and tenant_resolver is None:
            tenant_resolver = _DEFAULT_TENANT
        device_id, device_resolver = compile_resolver("device", device)
        no_device = device_id is None and device_resolver is None
        if no_device and client is not None and client.device_id is None:
            # Logged, not raised: it comes from the environment (METER_DEVICE_ID unset on
            # one host), and Starlette builds middleware at the first call, so a raise
            # here would answer every request of the app with a 500.
            logger.error(
                "MeterMiddleware has no device id: set METER_DEVICE_ID (the client's "
                "device_id) or pass device=; until then requests are not metered "
                "(counted as unconfigured in stats)"
            )
        if isinstance(close_timeout, bool) or not isinstance(close_timeout, (int, float)):
            raise ConfigurationError(f"close_timeout: must be a number, got {close_timeout!r}")
        if not 0 <= close_timeout <= 86_400:  # also refuses nan; inf would overflow a wait
            raise ConfigurationError(
                f"close_timeout: must be a number of seconds from 0 to 86400, got {close_timeout!r}"
            )
        self._close_timeout = float(close_timeout)
        self._rules_checked = False
        self._sessions = OpenSessions()  # websocket sessions not ended yet
        self._recorder = Recorder(
            client=client,
            tenant=tenant_id,
            tenant_resolver=tenant_resolver,
            device=device_id,
            device_resolver=device_resolver,
            allow_unknown_meters=allow_unknown_meters,
        )

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the counters: ``metered_requests``, ``events``, ``untenanted``
        (usage not recorded for want of a tenant id), ``unconfigured`` (successful
        requests and sessions with usage not recorded because there is no client: the
        owned one could not be built from the environment), ``invalid`` (usage dropped
        because an id, a meter or an amount was not valid: a bad usage header drops its
        meter only), ``metered_twice`` (requests that another MeterMiddleware on their
        way, nested in this one, metered too: both billed them; a websocket session
        metered by both is counted by the inner one), ``client_gone``
        (successful responses not billed because the client had left before they
        started, or before their end: a stream cut short), ``errors``,
        ``sessions_started``, ``sessions_ended``."""
        return dict(self._recorder.counters)

    @property
    def client(self) -> MeterClient | None:
        """The client in use (building the owned one from the environment if needed);
        None when it could not be built."""
        return self._recorder.client()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket" and self._has_sessions:
            await run_session(
                self.app,
                scope,
                receive,
                send,
                matcher=self._matcher,
                recorder=self._recorder,
                sessions=self._sessions,
            )
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- HTTP --------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        usage = RequestUsage(allow_unknown_meters=self._allow_unknown)
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {STATE_KEY: usage, USAGE_KEY: usage}
        else:
            held = state.get(STATE_KEY)
            if held is None or type(held) is RequestUsage:
                state[STATE_KEY] = usage
            else:  # the app's own (lifespan state named "meter"): leave it alone
                self._recorder.state_key_taken(held)
            state[USAGE_KEY] = usage
        path: str = scope.get("path", "")
        root_path: str = scope.get("root_path", "")
        strip = self._strip
        status = 0
        complete = False
        raw_headers: Sequence[tuple[bytes, bytes]] | None = None
        header_usage: dict[str, str] | None = None
        specs: tuple[MeterSpec, ...] = ()  # the route's meters, found as the response starts
        gone = False  # the caller left before it had the whole response
        body_sent = 0  # bytes of http.response.body messages

        async def observe(message: Message) -> None:
            nonlocal status, complete, raw_headers, header_usage, specs, gone, body_sent
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                if status in self._success:  # (the app has routed the request by now)
                    specs = self._specs(scope, path, root_path)
                    # A caller that gave up while the app worked (a client timeout) gets
                    # no result: uvicorn takes this response for a closed connection
                    # without an error. (Asked here, not at the end: a caller may hang up
                    # once it has the body its Content-Length promised, before the app's
                    # last, empty message. Asked of every successful response: a
                    # background task may add usage to one without any yet.)
                    gone = client_gone(receive)
                raw_headers = message.get("headers")
                if raw_headers is not None and type(raw_headers) is not list:
                    # any iterable is allowed: read once here, passed on as a list
                    raw_headers = list(raw_headers)
                    message = {**message, "headers": raw_headers}
                if strip and raw_headers:
                    message, header_usage = _strip_headers(message, raw_headers, strip)
            elif kind == "http.response.body":
                body_sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    # (a response with no usage yet is not looked at here, which spares
                    # unmetered routes the cost: usage a background task adds to it later
                    # is billed unless its caller had left before it started, asked above)
                    if (
                        not gone
                        and (specs or usage.entries)
                        and status in self._success
                        and _cut_short(scope, status, raw_headers, body_sent, receive)
                    ):
                        gone = True
                    await send(message)
                    complete = True  # the server took the end of the response
                    return
            elif kind in _FINAL_KINDS and not (
                kind != "http.response.pathsend" and message.get("more_body", False)
            ):
                await send(message)
                complete = True
                return
            await send(message)

        cancelled: asyncio.CancelledError | None = None
        try:
            await self.app(scope, receive, observe)
        except asyncio.CancelledError as exc:
            # Cancelled once the response went out in full and succeeded: the server
            # stopped the request afterwards (a background task outlived its graceful
            # shutdown timeout, a timeout middleware). The caller got its result: it is
            # billed below, with the usage added so far, before the cancellation goes on.
            cancelled = exc

        # A response is billed once complete: a stream cut short (the client left, the
        # app stopped) was not a successful call, nor was one whose caller had left.
        # (usage the handler added to a HEAD or OPTIONS request, which gives the caller no
        # result, is billed only when a rule names that method: an uptime check's HEAD
        # of a route whose GET handler adds usage bills nothing)
        billable = bool(specs) or (
            bool(usage.entries) and scope.get("method") not in METHODS_WITHOUT_RESULT
        )
        if complete and status in self._success and billable:
            if gone:  # (usage a background task added after the response included)
                self._recorder.counters["client_gone"] += 1
            else:
                writing = self._record(scope, state, path, specs, status, raw_headers,
                                       header_usage, usage)  # fmt: skip
                if writing is not None:  # a store write, in a worker thread
                    await writing
        if cancelled is not None:
            raise cancelled

    def _specs(self, scope: Scope, path: str, root_path: str) -> tuple[MeterSpec, ...]:
        """The volume meters of the route the app answered with (not its session ones).
        Never raises: a failure is logged and meters nothing."""
        if not self._has_rules:
            return ()
        try:
            method: str = scope.get("method", "GET")
            specs = self._matcher.specs(method, scope, path, root_path)
            if specs and self._has_sessions:
                specs = tuple(spec for spec in specs if not spec.session)
            return specs
        except Exception as exc:
            self._recorder.internal_error("matching a request's route", exc)
            return ()

    def _record(
        self,
        scope: Scope,
        state: dict[str, Any],
        path: str,
        specs: tuple[MeterSpec, ...],
        status: int,
        raw_headers: Sequence[tuple[bytes, bytes]] | None,
        header_usage: dict[str, str] | None,
        usage: RequestUsage,
    ) -> Coroutine[Any, Any, None] | None:
        """Record the events of a complete, successful response: enqueued here, or, when
        that writes to the store, the write to await (it runs in a worker thread and goes
        on if the caller is cancelled; it never raises but CancelledError). Never raises:
        a failure is logged."""
        recorder = self._recorder
        try:
            built = self._events(scope, path, specs, status, raw_headers, header_usage, usage)
            if built is not None:
                client, events = built
                # (counted first: a cancelled wait below does not stop the store write)
                recorder.counters["metered_requests"] += 1
                other = state.get(_METERED_BY)
                if other is not None and other is not self:
                    recorder.metered_twice(scope.get("method", "GET"), path)
                state[_METERED_BY] = self
                if client.enqueue_blocks(len(events)):
                    return recorder.submit(client, events)
                recorder.submit_nowait(client, events)
        except Exception as exc:
            recorder.internal_error("metering a request", exc)
        return None

    def _events(
        self,
        scope: Scope,
        path: str,
        specs: tuple[MeterSpec, ...],
        status: int,
        raw_headers: Sequence[tuple[bytes, bytes]] | None,
        header_usage: dict[str, str] | None,
        usage: RequestUsage,
    ) -> tuple[MeterClient, list[UsageEvent]] | None:
        """The client and the events of a successful request that has ``specs`` or usage
        entries (the caller checked); None: nothing to record."""
        method: str = scope.get("method", "GET")
        recorder = self._recorder
        client = recorder.client()
        if client is None:
            recorder.counters["unconfigured"] += 1
            return None
        who = recorder.who(scope, method, path, client)
        if who is None:
            return None
        tenant, device = who
        allow_unknown = client.allow_unknown_meters
        events: list[UsageEvent] = []
        try:
            # UsageEvent directly rather than client.event(): the same checks, one call less
            # on the path of every metered request.
            for spec in specs:
                amount = spec.usage
                if spec.header is not None or type(amount) is not int:
                    amount = recorder.amount(spec, scope, status, raw_headers, header_usage)
                if amount:
                    events.append(
                        UsageEvent(tenant, device, spec.meter_id, amount, None,
                                   spec.metadata or None, allow_unknown_meter=allow_unknown)
                    )  # fmt: skip
            for meter_id, amount, metadata in usage.entries:
                if amount:
                    events.append(
                        UsageEvent(tenant, device, meter_id, amount, None, metadata or None,
                                   allow_unknown_meter=allow_unknown)
                    )  # fmt: skip
        except InvalidEvent as exc:
            # All or nothing: a request is never billed for part of its usage.
            recorder.invalid_event(f"{method} {path}", exc)
            return None
        return (client, events) if events else None

    # -- lifespan ----------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass lifespan through; build the owned client at startup (so a configuration
        error shows in the log at once) and flush and close it before the server is told
        that shutdown is complete (a client the app gave is flushed, not closed). Open
        websocket sessions are ended as shutdown begins, before the app's own shutdown
        code (which may close its client) runs. A new lifespan (the app served again)
        starts with a new owned client if the last one was closed or could not be
        built."""
        recorder = self._recorder
        recorder.renew()

        async def observe_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self._end_sessions()
            return message

        async def observe(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                recorder.client()
                self._check_rules()
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._end_sessions()  # (opened while the app shut down)
                await recorder.shutdown(self._close_timeout)
            await send(message)

        await self.app(scope, observe_receive, observe)

    async def _end_sessions(self) -> None:
        """End this middleware's open websocket sessions (see :class:`OpenSessions`)."""
        try:
            await self._sessions.end_all()
        except Exception as exc:  # (end() logs its own failures: this is a bug of ours)
            self._recorder.internal_error("ending websocket sessions at shutdown", exc)

    def _check_rules(self) -> None:
        """Warn, once, about each rule that no route of the app can match (see
        :mod:`meter_asgi.rule_check`); the app is fully built at lifespan startup."""
        if self._rules_checked or not self._has_rules:
            return
        self._rules_checked = True
        try:
            messages = unmatched_rules(self.app, self._rules)
        except Exception as exc:  # a router of an unexpected shape: no check, no harm
            logger.debug("route rules not checked: %s", exc)
            return
        for message in messages or ():
            logger.warning("%s", message)


def _cut_short(
    scope: Scope,
    status: int,
    raw_headers: Sequence[tuple[bytes, bytes]] | None,
    body_sent: int,
    receive: Receive,
) -> bool:
    """Whether a response that its last body message is ending never reached its caller
    in full: fewer bytes than its Content-Length (a stream a middleware inside this one,
    such as BaseHTTPMiddleware, ends once the app's was cut short), or, framed by that
    last message (chunked), a caller already gone. A response with no body to frame
    (HEAD, 204, 304) is whole once its headers went out."""
    if status in (204, 304) or scope.get("method") == "HEAD":
        return False
    length = _content_length(raw_headers)
    if length is not None:
        return body_sent < length
    return client_gone(receive)


def _content_length(raw_headers: Sequence[tuple[bytes, bytes]] | None) -> int | None:
    """The response's Content-Length; None when it has none, or not one valid value."""
    found: int | None = None
    for name, value in raw_headers or ():
        if name.lower() == b"content-length":
            text = value.strip()
            if not text.isdigit() or (found is not None and found != int(text)):
                return None
            found = int(text)
    return found


def _strip_headers(
    message: Message, raw: Sequence[tuple[bytes, bytes]], strip: Collection[bytes]
) -> tuple[Message, dict[str, str] | None]:
    """The message without the usage headers, and their values (None: none was set)."""
    found: dict[str, str] | None = None
    kept: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        lowered = name.lower()
        if lowered in strip:
            if found is None:
                found = {}
            key = lowered.decode("latin-1")
            text = value.decode("latin-1")
            earlier = found.get(key)
            # Set twice with different values: joined as HTTP does, which is not a valid
            # usage (that meter is dropped and counted as invalid), never one of the two.
            found[key] = text if earlier is None or earlier == text else f"{earlier}, {text}"
        else:
            kept.append((name, value))
    if found is None:
        return message, None
    return {**message, "headers": kept}, found


def _statuses(value: object) -> frozenset[int] | range:
    if isinstance(value, range):
        if value.step != 1 or not value or value.start < 100 or value.stop > 600:
            raise ConfigurationError(
                f"success_statuses: must be a range within 100..599 with step 1, got {value!r}"
            )
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"success_statuses: must be a range or a collection of ints, got {value!r}"
        )
    statuses = frozenset(value)
    if not statuses or not all(type(status) is int and 100 <= status <= 599 for status in statuses):
        raise ConfigurationError(
            f"success_statuses: must be HTTP statuses (ints 100..599), got {value!r}"
        )
    return statuses
