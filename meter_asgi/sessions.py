"""AI session meters on websocket routes.

A ``"WEBSOCKET /ws/chat": {"meter": "chat.on.time_hours", "session": True}`` rule makes
each accepted connection of that route one session:

- when the app accepts the connection (``websocket.accept`` went out), a start event
  (``start_time``) per session meter is enqueued;
- when the app's handling of the connection ends, however it ends (clean close by
  either side, a dropped connection, an exception in the app, cancellation at server
  shutdown), the matching end event (``end_time``) is enqueued; sessions still open when
  the server's lifespan shutdown begins (handlers it cancelled, still cleaning up) are
  ended then, before the app's own shutdown closes its client (for a middleware that gets
  lifespan events: not one on a mounted sub-app).

The end event is enqueued when the app's handler returns, but its ``end_time`` is when
the connection ended, as the middleware first sees it: the app's ``websocket.close``
went out, the app received ``websocket.disconnect``, or a send of the app raised (the
connection is gone). Only when none of these happened (the handler returned or raised
with the connection still open) is it the time the handler ended. So work the app does
after the connection closed (saving a transcript) is not billed, nor is the time a
push-only handler takes to notice that its client left (up to its next send).

Both events carry the same ``session_id`` in their metadata (plus the rule's own
metadata). A connection the app refuses (closed before accepting) is no session.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from meter_asgi.recording import Recorder
from meter_asgi.routes import WEBSOCKET, RouteMatcher
from meter_asgi.types import ASGIApp, Message, Receive, Scope, Send
from meter_core import InvalidEvent, MeterClient, MeterSpec, UsageEvent, now_ms

__all__ = ["SESSION_ID_KEY", "OpenSessions", "run_session"]

SESSION_ID_KEY = "session_id"

# The recorder (one per middleware) that opened a session for the connection, in
# ``scope["state"]``: a second MeterMiddleware on its way (nested apps) finds it there.
_SESSION_BY = "meter.session_metered_by"


@dataclass(frozen=True, slots=True)
class _Session:
    client: MeterClient
    specs: tuple[MeterSpec, ...]
    tenant: str
    device: str
    session_id: str


class OpenSessions:
    """The sessions of one middleware whose end event is not recorded yet, so that a
    server shutting down can end them (:meth:`end_all`) before the client is flushed and
    closed. Used on the event loop only."""

    def __init__(self) -> None:
        self._open: set[_OpenSession] = set()

    def add(self, opened: _OpenSession) -> None:
        self._open.add(opened)

    def discard(self, opened: _OpenSession) -> None:
        self._open.discard(opened)

    async def end_all(self) -> None:
        """Record the end of every open session now (at lifespan shutdown: uvicorn cancels
        the handlers still running after its graceful timeout, and may exit before their
        cleanup ends, which would leave the sessions started and never ended)."""
        for opened in list(self._open):
            await opened.end()


class _OpenSession:
    """One accepted session: its end is recorded once, by whichever comes first, the
    end of the app's handler or a shutdown (:meth:`OpenSessions.end_all`)."""

    __slots__ = ("done", "ended_at", "recorder", "registry", "session")

    def __init__(self, session: _Session, recorder: Recorder, registry: OpenSessions) -> None:
        self.session = session
        self.recorder = recorder
        self.registry = registry
        self.ended_at: int | None = None  # when its connection ended, as first seen
        self.done = False
        registry.add(self)

    async def end(self) -> None:
        """Record the session's end event, once (a second call does nothing); its
        ``end_time`` is when the connection ended, or now. Never raises but
        CancelledError: a failure is logged."""
        if self.done:
            return
        self.done = True  # (set before any await: the other caller skips)
        self.registry.discard(self)
        recorder = self.recorder
        try:
            end_time = self.ended_at if self.ended_at is not None else now_ms()
            events = _events(self.session, end_time=end_time)
        except Exception as exc:
            recorder.internal_error("ending a websocket session", exc)
            return
        await recorder.submit(self.session.client, events)
        recorder.counters["sessions_ended"] += 1


async def run_session(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    matcher: RouteMatcher,
    recorder: Recorder,
    sessions: OpenSessions,
) -> None:
    """Run the app for one websocket connection, recording session start and end events
    for the session meters of its route. The app's messages and exceptions pass through
    unchanged; metering failures are logged, never raised."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    current: _OpenSession | None = None
    started = False

    async def observe(message: Message) -> None:
        nonlocal current, started
        if current is None:
            if started or message["type"] != "websocket.accept":
                await send(message)  # no session (yet, or on this route): pass through
                return
            started = True
            await send(message)
            try:
                opened = _open(scope, path, root_path, matcher, recorder)
            except Exception as exc:
                recorder.internal_error("starting a websocket session", exc)
                return
            if opened is not None:
                session, start_events = opened
                current = _OpenSession(session, recorder, sessions)
                await recorder.submit(session.client, start_events)
                recorder.counters["sessions_started"] += 1
            return
        if current.ended_at is not None:
            await send(message)
            return
        try:
            await send(message)
        except OSError:
            # What servers raise once the client left (ASGI spec); other errors (a
            # message out of order) and cancellation say nothing of the connection.
            if current.ended_at is None:
                current.ended_at = now_ms()
            raise
        if message["type"] == "websocket.close" and current.ended_at is None:
            current.ended_at = now_ms()  # the app closed the connection: the session ends here

    async def observe_receive() -> Message:
        message = await receive()
        if (
            current is not None
            and current.ended_at is None
            and message["type"] == "websocket.disconnect"
        ):
            current.ended_at = now_ms()  # the client left, or the connection dropped
        return message

    try:
        await app(scope, observe_receive, observe)
    finally:
        if current is not None:
            await current.end()


def _open(
    scope: Scope, path: str, root_path: str, matcher: RouteMatcher, recorder: Recorder
) -> tuple[_Session, list[UsageEvent]] | None:
    specs = tuple(s for s in matcher.specs(WEBSOCKET, scope, path, root_path) if s.session)
    if not specs:
        return None
    client = recorder.client()
    if client is None:
        recorder.counters["unconfigured"] += 1
        return None
    who = recorder.who(scope, "websocket session", path, client)
    if who is None:
        return None
    session = _Session(client, specs, who[0], who[1], str(uuid.uuid4()))
    try:
        # A bad id or meter shows here, at the start: such a session is not metered.
        events = _events(session, start_time=now_ms())
    except InvalidEvent as exc:
        recorder.invalid_event(f"websocket session {path}", exc)
        return None
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    other = state.get(_SESSION_BY)
    if other is not None and other is not recorder:  # (the inner one sees the outer)
        recorder.metered_twice("websocket session", path)
    state[_SESSION_BY] = recorder
    return session, events


def _events(
    session: _Session, *, start_time: int | None = None, end_time: int | None = None
) -> list[UsageEvent]:
    out = []
    for spec in session.specs:
        metadata = {**spec.metadata, SESSION_ID_KEY: session.session_id}
        out.append(
            session.client.session_event(
                tenant_id=session.tenant,
                device_id=session.device,
                meter_id=spec.meter_id,
                start_time=start_time,
                end_time=end_time,
                metadata=metadata,
            )
        )
    return out
