"""Per-request metering shared by the middleware and the ``@meter`` decorator: which
responses count, how much a rule or decorator meters for a response, and recording a
request's usage for its tenant.

Nothing here does network I/O: recording only enqueues (or, in durable mode, writes the
outbox row, or queues the event in memory when that write fails). Tenant and device
resolvers may touch the database (``request.user``), so async callers run
:func:`record_request` through ``sync_to_async``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from django.http import HttpRequest
from django.http.response import HttpResponseBase

from meter_core import (
    ConfigurationError,
    InvalidEvent,
    LogThrottle,
    MeterSpec,
    RequestUsage,
    RouteRules,
    parse_usage_header,
)
from meter_django.conf import conf, parse_statuses
from meter_django.recording import record_decided_usage
from meter_django.resolvers import device_resolver, tenant_resolver, why_no_tenant

__all__ = [
    "Entry",
    "MeteredRequestUsage",
    "log_failure",
    "record_request",
    "route_rules",
    "spec_usage",
    "success_statuses",
    "untenanted_count",
    "usage_of",
]

logger = logging.getLogger("meter.django.middleware")

Entry = tuple[str, int, Mapping[str, str]]


class _UntenantedCounter:
    """Counts requests that had usage but no tenant, logging at most once a minute."""

    def __init__(self) -> None:
        self.throttle = LogThrottle(logger, interval=60.0)

    def add(self, request: HttpRequest) -> None:
        self.throttle.log(
            logging.WARNING,
            "usage of %s %s not metered: no tenant for the request: %s",
            request.method,
            request.path,
            _NoTenantReason(request),
        )


class _NoTenantReason:
    """Why a request has no tenant, worked out only if the line is logged (most are not:
    the throttle keeps one a minute)."""

    __slots__ = ("request",)

    def __init__(self, request: HttpRequest) -> None:
        self.request = request

    def __str__(self) -> str:
        try:
            return why_no_tenant(self.request, conf.get("TENANT"))
        except Exception:  # (a log line's detail must not break the request)
            return "METER['TENANT']"


_untenanted = _UntenantedCounter()
_misconfigured = LogThrottle(logger, interval=60.0)
# a view or rule that gives a bad amount usually does so at every request
_invalid_usage = LogThrottle(logger, interval=60.0)
# each fails alike at every request until the code or the settings change: one line a
# minute each (one throttle per condition, so that one does not hide another)
_usage_failed = LogThrottle(logger, interval=60.0)
_tenant_resolver_failed = LogThrottle(logger, interval=60.0)
_device_resolver_failed = LogThrottle(logger, interval=60.0)
_event_refused = LogThrottle(logger, interval=60.0)
_not_recorded = LogThrottle(logger, interval=60.0)


class _Failure:
    """``ExceptionType: message`` of an exception, for a log line; never raises (an
    exception whose ``str()`` fails must not break the request that logs it)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __str__(self) -> str:
        name = type(self.exc).__name__
        try:
            return f"{name}: {self.exc}"
        except Exception:
            return name


def log_failure(
    throttle: LogThrottle,
    level: int,
    exc: BaseException,
    message: str,
    *args: Any,
    debug_logger: logging.Logger = logger,
    kind: Hashable = None,
) -> None:
    """Log ``message % args`` followed by ``exc``'s type and message through
    ``throttle`` (one line per interval, with the count, carrying the traceback), and
    the occurrences it holds back at debug level, as meter_asgi does: a failure that
    repeats at every request must not flood the host's logs. Failures of another
    exception type, or of another ``kind`` (a meter id), are throttled apart, so that
    one does not hide the other. Never raises."""
    try:
        line = (f"{message}: %s", *args, _Failure(exc))
        if not throttle.log(level, *line, exc_info=exc, key=(type(exc), kind)):
            debug_logger.debug(message, *args, exc_info=exc)
    except Exception:  # pragma: no cover - a broken handler must not break the app
        pass


def untenanted_count() -> int:
    """Requests in this process whose usage was not recorded for want of a tenant."""
    return _untenanted.throttle.count


def success_statuses() -> frozenset[int]:
    """``METER["METER_STATUSES"]`` as a set (2xx by default). Raises ConfigurationError."""

    return conf.cached("success_statuses", lambda: parse_statuses(conf.get("METER_STATUSES")))


def route_rules() -> RouteRules:
    """``METER["RULES"]`` compiled once (until the settings change)."""
    return conf.cached(
        "route_rules",
        lambda: RouteRules(conf.get("RULES"), allow_unknown_meters=conf.allow_unknown_meters),
    )


_late_add = LogThrottle(logger, interval=60.0)


class MeteredRequestUsage(RequestUsage):
    """``request.meter`` under the middleware: a :class:`meter_core.RequestUsage` that
    logs a warning (rate limited) for usage added once the request was metered, which
    is not billed: say, from a thread the view started."""

    __slots__ = ("_where", "closed")

    def __init__(self, *, allow_unknown_meters: bool = False) -> None:
        super().__init__(allow_unknown_meters=allow_unknown_meters)
        self.closed = False
        self._where = ""

    def add(self, meter_id: str, n: int = 1, *, metadata: Mapping[str, str] | None = None) -> None:
        super().add(meter_id, n, metadata=metadata)
        if self.closed:
            _late_add.log(
                logging.WARNING,
                "usage of %r added to request.meter after %s was metered: not billed "
                "(record it with record_usage())",
                meter_id,
                self._where or "the request",
            )

    def close(self, request: HttpRequest) -> None:
        """No more usage of this request is billed: a later add() logs a warning."""
        self.closed = True
        self._where = f"{request.method} {request.path}"


def new_request_usage() -> MeteredRequestUsage:
    return MeteredRequestUsage(allow_unknown_meters=conf.allow_unknown_meters)


def _as_count(value: Any, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _invalid_usage.log(
            logging.ERROR,
            "meter usage from %s must be an int >= 0, got %r: not recorded",
            source,
            value,
        )
        return None
    return value


def spec_usage(
    spec: MeterSpec, request: HttpRequest, response: HttpResponseBase, header_value: str | None
) -> int | None:
    """Units ``spec`` meters for this response: its constant, its callable's answer
    ``usage(request, response)``, or the integer in its response header (read before
    the header was removed, with :func:`meter_core.parse_usage_header`, as meter_asgi
    does). None when there is nothing to record; a header value that is not a valid
    usage is logged (rate limited: one line a minute, with the count) and only this
    meter is dropped."""
    if spec.header is not None:
        if header_value is None:
            return None
        try:
            return parse_usage_header(spec.header, header_value)
        except InvalidEvent as exc:
            _invalid_usage.log(
                logging.ERROR, "usage of meter %r not recorded: %s", spec.meter_id, exc
            )
            return None
    if callable(spec.usage):
        return _as_count(spec.usage(request, response), f"usage callable of {spec.meter_id!r}")
    return spec.usage


def pop_header(response: HttpResponseBase, name: str) -> str | None:
    """Remove a usage header from the response (it is for us, not the client)."""
    value = response.headers.get(name)
    if value is not None:
        del response.headers[name]
    return value


def pop_headers(specs: Iterable[MeterSpec], response: HttpResponseBase) -> dict[str, str | None]:
    """Remove the usage headers of ``specs`` from the response; their values by name."""
    values: dict[str, str | None] = {}
    for spec in specs:
        if spec.header and spec.header not in values:
            values[spec.header] = pop_header(response, spec.header)
    return values


def usage_of(
    specs: Iterable[MeterSpec],
    request: HttpRequest,
    response: HttpResponseBase,
    headers: Mapping[str, str | None] | None = None,
) -> list[Entry]:
    """Entries for ``specs``; usage headers are always removed from the response.
    ``headers``: the values of usage headers already removed (by :func:`pop_headers`,
    before a streaming response's headers left)."""
    entries: list[Entry] = []
    for spec in specs:
        if not spec.header:
            header_value = None
        elif headers is not None and spec.header in headers:
            header_value = headers[spec.header]
        else:
            header_value = pop_header(response, spec.header)
        try:
            n = spec_usage(spec, request, response, header_value)
        except Exception as exc:
            log_failure(
                _usage_failed,
                logging.ERROR,
                exc,
                "usage of meter %r could not be computed (%s %s): not recorded",
                spec.meter_id,
                request.method,
                request.path,
                kind=spec.meter_id,
            )
            continue
        if n:
            entries.append((spec.meter_id, n, spec.metadata))
    return entries


def record_request(request: HttpRequest, entries: list[Entry]) -> list[str]:
    """Record ``entries`` for the request's tenant and device; returns the event ids.
    Without a tenant nothing is recorded (counted, and logged rate limited). Errors are
    logged per entry and never raised. In durable mode an event the failure store
    refuses is queued in memory and sent as in default mode, not lost (see
    :func:`meter_django.recording.record_decided_usage`)."""
    if not entries:
        return []
    try:
        tenant = tenant_resolver()(request)
    except ConfigurationError as exc:  # reported by the system checks: one line a minute
        _misconfigured.log(logging.ERROR, "usage not recorded: %s (see manage.py check)", exc)
        return []
    except Exception as exc:
        log_failure(
            _tenant_resolver_failed,
            logging.ERROR,
            exc,
            "the tenant resolver failed: usage of %s %s not recorded",
            request.method,
            request.path,
        )
        return []
    if tenant is None:
        _untenanted.add(request)
        return []
    device: str | None = None
    try:
        resolve_device = device_resolver()
        if resolve_device is not None:
            device = resolve_device(request)
    except ConfigurationError as exc:
        _misconfigured.log(logging.ERROR, "usage not recorded: %s (see manage.py check)", exc)
        return []
    except Exception as exc:
        log_failure(
            _device_resolver_failed,
            logging.ERROR,
            exc,
            "the device resolver failed: usage of %s %s not recorded",
            request.method,
            request.path,
        )
        return []
    ids: list[str] = []
    for meter_id, n, metadata in entries:
        try:
            # record_usage's transaction rules, and events kept in the database when the
            # settings cannot build a client; a durable write that fails is not lost
            ids.append(
                record_decided_usage(
                    tenant_id=tenant,
                    device_id=device,
                    meter_id=meter_id,
                    total_usage=n,
                    metadata=metadata or None,
                )
            )
        except Exception as exc:
            # an unknown meter id, a metadata value no store can keep: the event itself
            # is refused; anything else is a failure of the recording
            log_failure(
                _event_refused if isinstance(exc, InvalidEvent) else _not_recorded,
                logging.ERROR,
                exc,
                "usage of meter %r for tenant %r (%s %s) not recorded",
                meter_id,
                tenant,
                request.method,
                request.path,
                kind=meter_id,
            )
    return ids
