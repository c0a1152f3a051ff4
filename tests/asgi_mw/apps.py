"""Small apps the middleware tests serve: a FastAPI app, a Starlette app and a bare ASGI
callable, plus a stand-in authentication middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from meter_asgi import meter_usage
from meter_core import RequestUsage
from tests.asgi_mw.conftest import MARKER_TENANT

USER_HEADER = b"x-test-user"


class User:
    is_authenticated = True

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id


class FakeAuth:
    """Stands in for an authentication middleware: ``x-test-user: <tenant>`` (think of it
    as a verified token) becomes ``scope["user"]``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            for name, value in scope["headers"]:
                if name == USER_HEADER:
                    scope["user"] = User(value.decode())
        await self.app(scope, receive, send)


def count_usage(scope: Mapping[str, Any], status: int, headers: Mapping[str, str]) -> int:
    return int(headers["x-items"]) * (2 if status == 201 else 1)


FASTAPI_ROUTES: dict[str, Any] = {
    "POST /documents/{doc_id}/scan": "page.processed.basic",
    "POST /missing": "page.processed.basic",
    "POST /broken": "page.processed.basic",
    "POST /crash": "page.processed.basic",
    "GET /stream": "report.generated.large",
    "POST /pages": {"meter": "page.processed.advanced", "header": "X-Meter-Pages"},
    "POST /multi": ["report.generated.small", {"meter": "rule.executed.small", "usage": 3}],
    "POST /count": {"meter": "template.processed.count", "usage": count_usage},
    "GET /v1/reports/{kind}": {"meter": "report.generated.medium", "metadata": {"api": "v1"}},
    "POST /background": "report.generated.insights",
    "POST /marker": "template.licensed.total",
}

STREAM_PAUSE = 1.0
background_done: list[str] = []


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post("/documents/{doc_id}/scan")
    async def scan(doc_id: str) -> dict[str, str]:
        return {"scanned": doc_id}

    @app.get("/documents/{doc_id}/scan")
    async def scan_status(doc_id: str) -> dict[str, str]:
        return {"status": "done"}

    @app.post("/missing")
    async def missing() -> None:
        raise HTTPException(404, "no such document")

    @app.post("/broken")
    async def broken() -> JSONResponse:
        return JSONResponse({"error": "backend down"}, status_code=503)

    @app.post("/crash")
    async def crash() -> None:
        raise RuntimeError("the handler crashed")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first,"
            await asyncio.sleep(STREAM_PAUSE)
            yield b"second"

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/pages")
    async def pages() -> PlainTextResponse:
        return PlainTextResponse("ok", headers={"X-Meter-Pages": "7", "X-Other": "kept"})

    @app.post("/pages-none")
    async def pages_none() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.post("/multi")
    async def multi() -> dict[str, str]:
        return {}

    @app.post("/count", status_code=201)
    async def count() -> PlainTextResponse:
        return PlainTextResponse("ok", status_code=201, headers={"x-items": "4"})

    @app.post("/handler")
    async def handler(usage: RequestUsage = Depends(meter_usage)) -> dict[str, str]:  # noqa: B008
        usage.add("chat.query.time_secs", 12, metadata={"model": "small"})
        return {}

    @app.post("/handler-fail")
    async def handler_fail(usage: RequestUsage = Depends(meter_usage)) -> None:  # noqa: B008
        usage.add("chat.query.time_secs", 12)
        raise HTTPException(400, "bad input")

    @app.get("/unmetered")
    async def unmetered() -> dict[str, str]:
        return {}

    @app.post("/background")
    async def background() -> JSONResponse:
        return JSONResponse({}, background=BackgroundTask(background_done.append, "ran"))

    @app.post("/marker")
    async def marker() -> dict[str, str]:
        return {}

    v1 = APIRouter(prefix="/reports")

    @v1.get("/{kind}")
    async def report(kind: str) -> dict[str, str]:
        return {"kind": kind}

    app.include_router(v1, prefix="/v1")
    return app


# -- Starlette: request.state.meter and websocket sessions -----------------------------


async def add_usage(request: Request) -> PlainTextResponse:
    request.state.meter.add("report.generated.dataquery", 5, metadata={"q": "x"})
    return PlainTextResponse("ok")


async def marker(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def tenant_doc(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            if text == "crash":
                raise RuntimeError("the chat handler crashed")
            if text == "bye":
                await websocket.close()
                return
            await websocket.send_text(f"echo {text}")
    except WebSocketDisconnect:
        pass


async def refuse(websocket: WebSocket) -> None:
    await websocket.close(code=4403)


STARLETTE_ROUTES: dict[str, Any] = {
    "WEBSOCKET /ws/chat": {"meter": "chat.on.time_hours", "session": True},
    "WEBSOCKET /ws/refuse": {"meter": "chat.on.time_hours", "session": True},
    "POST /marker": "template.licensed.total",
    "POST /api/tenants/{tenant}/docs": "page.processed.basic",
}


def starlette_app() -> Starlette:
    api = Starlette(routes=[Route("/tenants/{tenant}/docs", tenant_doc, methods=["POST"])])
    return Starlette(
        routes=[
            Route("/usage", add_usage, methods=["POST"]),
            Route("/usage-get", add_usage, methods=["GET"]),  # (Starlette adds HEAD)
            Route("/marker", marker, methods=["POST"]),
            WebSocketRoute("/ws/chat", chat),
            WebSocketRoute("/ws/refuse", refuse),
            Mount("/api", app=api),
        ]
    )


# -- a bare ASGI callable: no router, no route template in the scope -------------------


async def bare_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    status = 404 if scope["path"].startswith("/nowhere") else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"bare"})


async def usage_header_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers 200 with an ``x-meter-pages`` header set to the ``pages`` query value as
    given (whitespace and all)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    query = parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    headers = [(b"x-meter-pages", value.encode("latin-1")) for value in query.get("pages", [])]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"pages"})


__all__ = ["MARKER_TENANT"]


# -- websocket sessions whose handler keeps working after the connection ended ---------


def session_timing_routes() -> dict[str, Any]:
    """The session rules of :func:`session_timing_app`."""
    return {
        f"WEBSOCKET /ws/{name}": {"meter": "chat.on.time_hours", "session": True}
        for name in ("close-then-work", "push-then-work", "listen-then-work")
    }


def session_timing_app(work: float) -> Starlette:
    """Websocket handlers that spend ``work`` seconds after their connection ended:

    - ``/ws/close-then-work`` closes the connection on the first message, then works;
    - ``/ws/push-then-work`` sends ``ready``, then a ``tick`` every 0.2 s and never
      receives: it learns that the client left from a failed send, then works;
    - ``/ws/listen-then-work`` receives until the client leaves, then works.
    """

    async def close_then_work(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        await websocket.close()
        await asyncio.sleep(work)

    async def push_then_work(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("ready")
        try:
            while True:
                await asyncio.sleep(0.2)
                await websocket.send_text("tick")
        except WebSocketDisconnect:
            await asyncio.sleep(work)

    async def listen_then_work(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            await asyncio.sleep(work)

    return Starlette(
        routes=[
            WebSocketRoute("/ws/close-then-work", close_then_work),
            WebSocketRoute("/ws/push-then-work", push_then_work),
            WebSocketRoute("/ws/listen-then-work", listen_then_work),
        ]
    )
