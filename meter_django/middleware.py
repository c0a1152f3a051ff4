"""MeterMiddleware: per-view metering for WSGI and ASGI Django.

For each request it sets ``request.meter`` (a :class:`meter_core.RequestUsage` the view
may add to), runs the view, then, when the response status is metered
(``METER["METER_STATUSES"]``, 2xx by default), records:

- the meters of ``METER["RULES"]`` matching the resolved route
  (``request.resolver_match.route``, e.g. ``"POST /documents/<int:pk>/scan"``) or view
  name (``"documents:export"``), with their usage (an int, a callable
  ``(request, response) -> int``, or a response header, removed before the response
  leaves);
- what the view added to ``request.meter`` (directly or through ``@meter``).

The tenant is resolved after the view (``METER["TENANT"]``), so users authenticated
during the view (DRF's authentication sets ``request.user`` on the Django request) are
billed. Requests without a tenant are counted and logged, not metered.

Guarantees: the request path never waits on the network (recording only enqueues); an
internal error, or settings that cannot build a client, is logged and swallowed, and the
response goes out unchanged (apart from usage headers). Works in sync and async stacks
without a thread switch for requests that meter nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from meter_core import ConfigurationError, LogThrottle, MeterSpec, RequestUsage
from meter_django.metering import (
    Entry,
    new_request_usage,
    record_request,
    route_rules,
    success_statuses,
    usage_of,
)

__all__ = ["MeterMiddleware"]

logger = logging.getLogger("meter.django.middleware")
_misconfigured = LogThrottle(logger, interval=60.0)

GetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


def _attach(request: HttpRequest) -> None:
    try:
        request.meter = new_request_usage()  # type: ignore[attr-defined]
    except ConfigurationError as exc:  # reported by the system checks: one line a minute
        _misconfigured.log(logging.ERROR, "request.meter set up with defaults: %s", exc)
        request.meter = RequestUsage()  # type: ignore[attr-defined]
    except Exception:
        logger.exception("metering is misconfigured: request.meter not set up")
        request.meter = RequestUsage()  # type: ignore[attr-defined]


def _matching_specs(request: HttpRequest) -> tuple[MeterSpec, ...]:
    rules = route_rules()
    if not rules:
        return ()
    match = getattr(request, "resolver_match", None)
    if match is None:
        return ()
    method = request.method or "GET"
    return rules.match_route(method, match.route) + rules.match(method, match.view_name)


def _collect(request: HttpRequest, response: HttpResponseBase) -> list[Entry]:
    """Usage of this request, with usage headers removed; [] when nothing is metered."""
    try:
        specs = _matching_specs(request)
    except Exception:
        logger.exception("METER['RULES'] cannot be used: no rule metered this request")
        specs = ()
    if response.status_code not in success_statuses():
        for spec in specs:
            if spec.header:
                response.headers.pop(spec.header, None)
        return []
    entries = usage_of(specs, request, response)
    usage = getattr(request, "meter", None)
    if isinstance(usage, RequestUsage):
        entries.extend((m, n, md) for m, n, md in usage.entries if n)
    return entries


class MeterMiddleware:
    """Meters successful responses by rule, by ``request.meter`` and by ``@meter``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse | AsyncGetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.__acall__(request)
        _attach(request)
        response = cast(HttpResponseBase, self.get_response(request))
        try:
            entries = _collect(request, response)
            if entries:
                record_request(request, entries)
        except Exception:
            logger.exception("metering of %s %s failed", request.method, request.path)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        _attach(request)
        response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        try:
            entries = _collect(request, response)
            if entries:
                # resolving the tenant may query the database (request.user)
                await sync_to_async(record_request)(request, entries)
        except Exception:
            logger.exception("metering of %s %s failed", request.method, request.path)
        return response
