"""AI session meters on websocket routes.

A ``"WEBSOCKET /ws/chat": {"meter": "chat.on.time_hours", "session": True}`` rule makes
each accepted connection of that route one session:

- when the app accepts the connection (``websocket.accept`` went out), a start event
  (``start_time``) per session meter is enqueued;
- when the app's handling of the connection ends, however it ends (clean close by
  either side, a dropped connection, an exception in the app, cancellation at server
  shutdown), the matching end event (``end_time``) is enqueued.

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
    device: str | None
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

    async def observe(message: Message) -> None:
        nonlocal session, started
        if started or message["type"] != "websocket.accept":
            await send(message)
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

    try:
        await app(scope, receive, observe)
    finally:
        if session is not None:
            try:
                events = _events(session, end_time=now_ms())
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
    who = recorder.who(scope, "websocket session", path)
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
