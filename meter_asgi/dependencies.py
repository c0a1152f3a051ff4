"""The FastAPI dependency giving a handler its request's usage.

::

    @app.post("/documents/{doc_id}/scan")
    async def scan(doc_id: str, usage: RequestUsage = Depends(meter_usage)) -> dict:
        pages = await do_scan(doc_id)
        usage.add("page.processed.basic", pages, metadata={"doc_id": doc_id})

This module imports Starlette (FastAPI needs a real ``HTTPConnection`` annotation to
inject the connection); ``meter_asgi`` imports it only when ``meter_usage`` is first used.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from meter_asgi.middleware import STATE_KEY, USAGE_KEY
from meter_core import ConfigurationError, RequestUsage

__all__ = ["meter_usage"]


def meter_usage(connection: HTTPConnection) -> RequestUsage:
    """The :class:`~meter_core.RequestUsage` of the current HTTP request (the object at
    ``request.state.meter``). What is added to it is recorded after the response, only
    if the request succeeds.

    Raises :class:`~meter_core.ConfigurationError` when ``MeterMiddleware`` does not wrap
    the app (usage added there would be silently lost), and on a websocket route.
    """
    scope = connection.scope
    if scope.get("type") == "websocket":
        raise ConfigurationError(
            "meter_usage: only for HTTP requests; a websocket route is metered by a "
            "session rule (routes={'WEBSOCKET /path': {'meter': ..., 'session': True}})"
        )
    state = scope.get("state")
    usage = None
    if state is not None:  # (an empty RequestUsage is falsy: no `or` here)
        usage = state.get(USAGE_KEY)
        if usage is None:
            usage = state.get(STATE_KEY)
    if not isinstance(usage, RequestUsage):
        raise ConfigurationError(
            "meter_usage: no request usage in scope['state']; add MeterMiddleware to the app"
        )
    return usage
