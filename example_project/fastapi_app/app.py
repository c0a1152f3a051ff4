"""A FastAPI app metered with ``meter_asgi``.

Run it (with the local backend in another terminal, ``python -m meter_core devserver``)::

    uvicorn example_project.fastapi_app.app:app --port 8001

It sits behind a gateway that authenticates callers and sets ``X-Litewave-Tenant`` on
every request it forwards, overwriting whatever a client sent: that is what makes the
header trustworthy, and why the middleware is told ``trusted=True``. An app reachable
without such a gateway must take the tenant from its own authentication instead
(``from_user("tenant_id")``).

What is metered:

- ``POST /documents/{doc_id}/scan``: ``page.processed.basic``, as many pages as the
  handler reports in the ``X-Meter-Pages`` response header (removed before the response
  leaves the app);
- ``GET /search``: one ``report.generated.dataquery`` per call (a constant rule);
- ``POST /reports/{size}``: the handler adds usage itself through ``Depends(meter_usage)``;
- ``WEBSOCKET /ws/chat``: one ``chat.on.time_hours`` AI session per connection (a start
  event when it opens, an end event when it closes).

Undelivered events go to a SQLite spool (``METER_SPOOL_PATH``, default
``fastapi-spool.db`` next to this file); ``python -m meter_core retry --spool PATH``
resends them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Response, WebSocket, WebSocketDisconnect

from example_project.local_backend import litewave_urls
from meter_asgi import MeterMiddleware, from_header, meter_usage
from meter_core import MeterClient, RequestUsage

SPOOL_PATH = os.environ.get("METER_SPOOL_PATH", str(Path(__file__).with_name("fastapi-spool.db")))
REPORT_METERS = {
    "small": "report.generated.small",
    "medium": "report.generated.medium",
    "large": "report.generated.large",
}

client = MeterClient.from_env(
    **litewave_urls(),
    device_id=os.environ.get("METER_DEVICE_ID", "fastapi-example"),
    spool_path=SPOOL_PATH,
    flush_interval=0.2,
    max_retries=2,
    backoff_base=0.1,
    backoff_cap=0.5,
    timeout=2.0,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # The app built the client, so the app closes it: flush, then spool what is left.
    await client.aclose(timeout=5)


app = FastAPI(title="litewave-meter FastAPI example", lifespan=lifespan)
app.add_middleware(
    MeterMiddleware,
    client=client,
    routes={
        "POST /documents/{doc_id}/scan": {
            "meter": "page.processed.basic",
            "header": "X-Meter-Pages",
        },
        "GET /search": "report.generated.dataquery",
        "WEBSOCKET /ws/chat": {"meter": "chat.on.time_hours", "session": True},
    },
    tenant=from_header("X-Litewave-Tenant", trusted=True),  # set by our gateway, see above
)


@app.post("/documents/{doc_id}/scan")
def scan(doc_id: int, response: Response, pages: int = 1) -> dict[str, object]:
    if doc_id <= 0:
        raise HTTPException(404, "no such document")  # a 4xx: nothing is metered
    response.headers["X-Meter-Pages"] = str(pages)
    return {"doc_id": doc_id, "pages": pages, "status": "scanned"}


@app.get("/search")
def search(q: str = "") -> dict[str, object]:
    return {"q": q, "hits": []}


@app.post("/reports/{size}")
def report(size: str, usage: Annotated[RequestUsage, Depends(meter_usage)]) -> dict[str, str]:
    meter = REPORT_METERS.get(size)
    if meter is None:
        raise HTTPException(422, f"size must be one of {sorted(REPORT_METERS)}")
    usage.add(meter, 1, metadata={"size": size})
    return {"report": size, "status": "generated"}


@app.websocket("/ws/chat")
async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            question = await websocket.receive_text()
            await websocket.send_text(f"You asked: {question}")
    except WebSocketDisconnect:
        pass
