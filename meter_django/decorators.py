"""``@meter(meter_id, usage=...)``: meter a function view (sync or async).

    @meter("page.processed.basic", usage=lambda request, response: response.pages)
    def scan(request, pk): ...

After the view returns a successful response (``METER["METER_STATUSES"]``, 2xx by
default) to any method but ``HEAD`` and ``OPTIONS`` (an uptime check or a CORS preflight
gets no result, as with a rule without methods), the usage (an int, a callable
``(request, response) -> int``, or the integer in the response ``header``, which is then
removed) is added to ``request.meter``; the middleware records it for the request's
tenant. Without the middleware installed the decorator records it itself. A bad
``meter_id`` or ``usage`` raises :class:`meter_core.ConfigurationError` when the module
is imported; errors while the request is metered are logged and never break the response.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from meter_core import METHODS_WITHOUT_RESULT, MeterSpec, RequestUsage
from meter_django.metering import Entry, record_request, success_statuses, usage_of

__all__ = ["meter"]

logger = logging.getLogger("meter.django")

V = TypeVar("V", bound=Callable[..., Any])
UsageArg = int | Callable[[HttpRequest, HttpResponseBase], "int | None"]


def _metered(spec: MeterSpec, request: HttpRequest, response: HttpResponseBase) -> list[Entry]:
    """Entries to record directly (middleware absent); [] when added to request.meter."""
    try:
        if (
            response.status_code not in success_statuses()
            or request.method in METHODS_WITHOUT_RESULT
        ):
            if spec.header:
                response.headers.pop(spec.header, None)
            return []
        entries = usage_of([spec], request, response)
        usage = getattr(request, "meter", None)
        if not isinstance(usage, RequestUsage):
            return entries
        for meter_id, n, metadata in entries:
            usage.add(meter_id, n, metadata=metadata)
    except Exception:
        logger.exception("metering of %r failed; the response is unaffected", spec.meter_id)
    return []


def meter(
    meter_id: str,
    usage: UsageArg = 1,
    *,
    header: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Callable[[V], V]:
    """Meter each successful response of the decorated view (see the module docstring)."""
    spec = MeterSpec(meter_id, usage=usage, header=header, metadata=metadata or {})

    def decorate(view: V) -> V:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                response = await view(request, *args, **kwargs)
                direct = _metered(spec, request, response)
                if direct:
                    await sync_to_async(record_request)(request, direct)
                return response

            return cast(V, async_wrapper)

        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            response = view(request, *args, **kwargs)
            direct = _metered(spec, request, response)
            if direct:
                record_request(request, direct)
            return response

        return cast(V, wrapper)

    return decorate
