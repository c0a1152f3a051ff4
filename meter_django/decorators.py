"""``@meter(meter_id, usage=...)``: meter a view function or a view method (sync or async).

    @meter("page.processed.basic", usage=lambda request, response: response.pages)
    def scan(request, pk): ...

    class ReportView(View):            # or a Django REST framework APIView
        @meter("report.generated.small")
        def get(self, request): ...

After the view returns a successful response (``METER["METER_STATUSES"]``, 2xx by
default) to any method but ``HEAD`` and ``OPTIONS`` (an uptime check or a CORS preflight
gets no result, as with a rule without methods), the usage (an int, a callable
``(request, response) -> int``, or the integer in the response ``header``, which is then
removed) is added to ``request.meter``; the middleware records it for the request's
tenant. Without the middleware installed the decorator records it itself.

The request is the view's first argument, or its second after ``self``; a usage
callable gets it as the view did (a Django REST framework ``Request`` on a DRF view),
and usage is recorded on the ``HttpRequest`` (the one a DRF ``Request`` wraps).
Decorating a class raises :class:`meter_core.ConfigurationError` (use
``method_decorator``; on an async class-based view's ``dispatch`` too). On an async
view, a usage callable runs in a worker thread (it may use the ORM).

A malformed ``meter_id`` or a bad ``usage`` raises :class:`meter_core.ConfigurationError`
when the module is imported. Whether ``meter_id`` is in the meter catalog is only known
once the app's own meters are registered, so it is checked by ``manage.py check``
(``meter_django.E012``, for the views the URLconf imports); at a request, an unknown
meter is logged and not recorded. Errors while the request is metered are logged and
never break the response.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from meter_core import (
    METHODS_WITHOUT_RESULT,
    ConfigurationError,
    LogThrottle,
    MeterSpec,
    RequestUsage,
)
from meter_django.metering import Entry, log_failure, record_request, success_statuses, usage_of

__all__ = ["declared_meters", "meter"]

logger = logging.getLogger("meter.django")
# a view that fails to be metered fails so at every request: one line a minute each,
# with the count (the traceback at debug level)
_no_request = LogThrottle(logger, interval=60.0)
_metering_failed = LogThrottle(logger, interval=60.0)

V = TypeVar("V", bound=Callable[..., Any])
UsageArg = int | Callable[[HttpRequest, HttpResponseBase], "int | None"]

# meter id -> the dotted names of the views decorated with it, for the system check of
# unknown meter ids
_declared: dict[str, set[str]] = {}


def declared_meters() -> dict[str, list[str]]:
    """Every meter id given to ``@meter`` in this process, with the dotted names of the
    views it decorates (sorted)."""
    return {meter_id: sorted(views) for meter_id, views in list(_declared.items())}


def _request_of(args: tuple[Any, ...]) -> tuple[Any, HttpRequest] | None:
    """The request among a view's first two arguments (``request``, or ``self`` then
    ``request``), as the view got it and as the HttpRequest: a DRF Request is not an
    HttpRequest but wraps one."""
    for arg in args[:2]:
        if isinstance(arg, HttpRequest):
            return arg, arg
        inner = getattr(arg, "_request", None)
        if isinstance(inner, HttpRequest):
            return arg, inner
    return None


def _metered(
    spec: MeterSpec, args: tuple[Any, ...], response: HttpResponseBase
) -> tuple[HttpRequest, list[Entry]] | None:
    """The request and the entries to record directly (middleware absent); None when
    there is nothing to record or the usage went to ``request.meter``."""
    try:
        found = _request_of(args)
        if found is None:
            _no_request.log(
                logging.ERROR,
                "@meter(%r): the view got no HttpRequest as its first or second argument: "
                "not metered",
                spec.meter_id,
            )
            return None
        given, request = found
        if (
            response.status_code not in success_statuses()
            or request.method in METHODS_WITHOUT_RESULT
        ):
            if spec.header:
                response.headers.pop(spec.header, None)
            return None
        entries = usage_of([spec], given, response)
        usage = getattr(request, "meter", None)
        if not isinstance(usage, RequestUsage):
            return (request, entries) if entries else None
        for meter_id, n, metadata in entries:
            usage.add(meter_id, n, metadata=metadata)
    except Exception as exc:
        log_failure(
            _metering_failed,
            logging.ERROR,
            exc,
            "metering of %r failed; the response is unaffected",
            spec.meter_id,
            debug_logger=logger,
        )
    return None


async def _metered_async(spec: MeterSpec, args: tuple[Any, ...], response: Any) -> None:
    """:func:`_metered` and the recording for an async view. A usage callable (which may
    query the database or block) runs in a worker thread, as the middleware runs its
    rules' ones, never on the event loop."""
    if callable(spec.usage):
        direct = await sync_to_async(_metered)(spec, args, response)
    else:
        direct = _metered(spec, args, response)
    if direct:
        await sync_to_async(record_request)(*direct)


async def _finish_async(spec: MeterSpec, args: tuple[Any, ...], pending: Any) -> Any:
    response = await pending
    await _metered_async(spec, args, response)
    return response


def meter(
    meter_id: str,
    usage: UsageArg = 1,
    *,
    header: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Callable[[V], V]:
    """Meter each successful response of the decorated view (see the module docstring)."""
    spec = MeterSpec(meter_id, usage=usage, header=header, metadata=metadata or {})
    # remembered now: with method_decorator, decorate() runs only at each request
    views = _declared.setdefault(spec.meter_id, set())

    def decorate(view: V) -> V:
        if isinstance(view, type):
            raise ConfigurationError(
                f"@meter({meter_id!r}) decorates view functions and methods, not the class "
                f"{view.__qualname__}: decorate its get()/post() method, or use "
                f"@method_decorator(meter({meter_id!r}), name='dispatch')"
            )
        views.add(f"{getattr(view, '__module__', '?')}.{getattr(view, '__qualname__', '?')}")
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                response = await view(*args, **kwargs)
                await _metered_async(spec, args, response)
                return response

            return cast(V, async_wrapper)

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            response = view(*args, **kwargs)
            if asyncio.iscoroutine(response):
                # A sync function that returns its handler's coroutine: dispatch() of an
                # async class-based view, under method_decorator(name="dispatch").
                return _finish_async(spec, args, response)
            direct = _metered(spec, args, response)
            if direct:
                record_request(*direct)
            return response

        return cast(V, wrapper)

    return decorate
