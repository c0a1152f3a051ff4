"""meter_asgi: usage metering middleware for ASGI apps (Starlette, FastAPI, any ASGI
callable), on top of :mod:`meter_core`.

::

    from meter_asgi import MeterMiddleware, from_user, meter_usage

    app.add_middleware(
        MeterMiddleware,
        routes={"POST /documents/{doc_id}/scan": "page.processed.basic"},
        tenant=from_user("tenant_id"),
    )

Importing this package does not import Starlette; ``meter_usage`` (the FastAPI
dependency) does, when it is first accessed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meter_asgi.middleware import MeterMiddleware
from meter_asgi.resolvers import Resolver, from_header, from_path_param, from_state, from_user

if TYPE_CHECKING:
    from meter_asgi.dependencies import meter_usage

__all__ = [
    "MeterMiddleware",
    "Resolver",
    "from_header",
    "from_path_param",
    "from_state",
    "from_user",
    "meter_usage",
]


def __getattr__(name: str) -> Any:
    if name == "meter_usage":
        from meter_asgi.dependencies import meter_usage

        return meter_usage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
