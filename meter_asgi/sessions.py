"""AI session meters on websocket routes.

A ``"WEBSOCKET /ws/chat": {"meter": "chat.on.time_hours", "session": True}`` rule makes
each accepted connection of that route one session:

- when the app accepts the connection (``websocket.accept`` went out), a start event
  (``start_time``) per session meter is enqueued;
- when the app's handling of the connection ends, however it ends (clean close by
  either side, a dropped connection, an exception in the app, cancellation at server
  shutdown), the matching end event (``end_time``) is enqueued.

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

__all__ = ["SESSION_ID_KEY", "run_session"]

SESSION_ID_KEY = "session_id"


@dataclass(frozen=True, slots=True)
class _Session:
    client: MeterClient
    specs: tuple[MeterSpec, ...]
    tenant: str
    device: str
    session_id: str


async def run_session(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    matcher: RouteMatcher,
    recorder: Recorder,
) -> None:
    """Run the app for one websocket connection, recording session start and end events
    for the session meters of its route. The app's messages and exceptions pass through
    unchanged; metering failures are logged, never raised."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    session: _Session | None = None
    started = False
    ended_at: int | None = None  # when the connection of the open session ended

    async def observe(message: Message) -> None:
        nonlocal session, started, ended_at
        if session is None:
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
                await recorder.submit(session.client, start_events)
                recorder.counters["sessions_started"] += 1
            return
        if ended_at is not None:
            await send(message)
            return
        try:
            await send(message)
        except OSError:
            # What servers raise once the client left (ASGI spec); other errors (a
            # message out of order) and cancellation say nothing of the connection.
            if ended_at is None:
                ended_at = now_ms()
            raise
        if message["type"] == "websocket.close" and ended_at is None:
            ended_at = now_ms()  # the app closed the connection: the session ends here

    async def observe_receive() -> Message:
        nonlocal ended_at
        message = await receive()
        if session is not None and ended_at is None and message["type"] == "websocket.disconnect":
            ended_at = now_ms()  # the client left, or the connection dropped
        return message

    try:
        await app(scope, observe_receive, observe)
    finally:
        if session is not None:
            try:
                end_time = ended_at if ended_at is not None else now_ms()
                events = _events(session, end_time=end_time)
            except Exception as exc:
                recorder.internal_error("ending a websocket session", exc)
            else:
                await recorder.submit(session.client, events)
                recorder.counters["sessions_ended"] += 1


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
