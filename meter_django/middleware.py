"""MeterMiddleware: per-view metering for WSGI and ASGI Django.

For each request it sets ``request.meter`` (a :class:`meter_core.RequestUsage` the view
may add to), runs the view, then, when the response status is metered
(``METER["METER_STATUSES"]``, 2xx by default), records:

- the meters of ``METER["RULES"]`` matching the resolved route
  (``request.resolver_match.route``, e.g. ``"POST /documents/<int:pk>/scan/"``) or view
  name (``"documents:export"``), with their usage (an int, a callable
  ``(request, response) -> int``, or a response header, removed before the response
  leaves);
- what the view added to ``request.meter`` (directly or through ``@meter``).

The tenant is resolved after the view (``METER["TENANT"]``), so users authenticated
during the view (DRF's authentication sets ``request.user`` on the Django request) are
billed. Requests without a tenant are counted and logged, not metered.

A streaming response is metered when its body has been sent in full, so usage the
body adds to ``request.meter`` while it streams is billed; a stream cut short (the
client left, the body raised) bills nothing. Usage added to ``request.meter`` after
the request was metered is not billed and logs a warning.

With ``ATOMIC_REQUESTS``, Django wraps the view, not this middleware, in the request's
transaction: a view that marks it for rollback (``transaction.set_rollback(True)``) yet
answers 2xx is still billed by rules and ``request.meter``. Bill such work with
``record_usage()`` inside it (it waits for the commit), or answer with an error status.

Guarantees: the request path never waits on the network (recording only enqueues); an
internal error, or settings that cannot build a client, is logged and swallowed, and the
response goes out unchanged (apart from usage headers). In durable mode, events the
failure store refuses (a database restarting) are queued in memory and sent as in
default mode, as meter_asgi does: the response is decided, so they cannot be refused
(a kill of the process meanwhile loses them). Works in sync and async stacks
without a thread switch for requests that meter nothing. On the async stack, usage
callables of ``RULES`` run with the recording, in one ``sync_to_async`` call (they may
query the database).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import ResolverMatch
from django.urls.resolvers import LocalePrefixPattern

from meter_core import (
    METHODS_WITHOUT_RESULT,
    ConfigurationError,
    LogThrottle,
    MeterSpec,
    RequestUsage,
)
from meter_django.metering import (
    Entry,
    MeteredRequestUsage,
    log_failure,
    new_request_usage,
    pop_headers,
    record_request,
    route_rules,
    success_statuses,
    usage_of,
)

__all__ = ["MeterMiddleware"]

logger = logging.getLogger("meter.django.middleware")
_misconfigured = LogThrottle(logger, interval=60.0)
_rules_unusable = LogThrottle(logger, interval=60.0)
# internal errors, logged one line a minute each with the count (the traceback at debug
# level): a bug that fails one request usually fails them all
_attach_failed = LogThrottle(logger, interval=60.0)
_record_failed = LogThrottle(logger, interval=60.0)
_internal_error = LogThrottle(logger, interval=60.0)
_listed_twice = LogThrottle(logger, interval=60.0)
_billed_by_both = LogThrottle(logger, interval=60.0)
_METERED_BY = "_meter_middleware"  # the MeterMiddleware metering a request

GetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


def _attach(request: HttpRequest) -> None:
    try:
        request.meter = new_request_usage()  # type: ignore[attr-defined]
    except ConfigurationError as exc:  # reported by the system checks: one line a minute
        _misconfigured.log(logging.ERROR, "request.meter set up with defaults: %s", exc)
        request.meter = RequestUsage()  # type: ignore[attr-defined]
    except Exception as exc:
        log_failure(
            _attach_failed,
            logging.ERROR,
            exc,
            "metering is misconfigured: request.meter of %s %s not set up",
            request.method,
            request.path,
        )
        request.meter = RequestUsage()  # type: ignore[attr-defined]


def _usage(request: HttpRequest) -> RequestUsage | None:
    usage = getattr(request, "meter", None)
    return usage if isinstance(usage, RequestUsage) else None


def _close_usage(request: HttpRequest) -> None:
    usage = _usage(request)
    if isinstance(usage, MeteredRequestUsage):
        usage.close(request)


def _matching_specs(request: HttpRequest) -> tuple[MeterSpec, ...]:
    rules = route_rules()
    if not rules:
        return ()
    match = getattr(request, "resolver_match", None)
    if match is None:
        return ()
    method = request.method or "GET"
    by_route = rules.match_route(method, match.route)
    if not by_route:
        # Under i18n_patterns() the route starts with the language's prefix ("fr/"): a
        # rule written as urls.py has it ("GET /page/") meters every language.
        unprefixed = _without_language_prefix(match)
        if unprefixed is not None:
            by_route = rules.match_route(method, unprefixed)
    return by_route + rules.match(method, match.view_name)


def _without_language_prefix(match: ResolverMatch) -> str | None:
    """The route of ``match`` without the language prefix of i18n_patterns(), when it
    was resolved through them (the first pattern of its path in the URLconf); None
    otherwise. The prefix is read from the route (``"fr/"``), not from the language
    active now, which the view may have changed."""
    tried = match.tried
    if not tried or not tried[-1]:
        return None
    if not isinstance(getattr(tried[-1][0], "pattern", None), LocalePrefixPattern):
        return None
    language, slash, rest = match.route.partition("/")
    if not slash or language not in _language_codes():
        return None  # (the default language, not prefixed)
    return rest


def _language_codes() -> frozenset[str]:
    return frozenset(code for code, _ in settings.LANGUAGES)


# -- what a response meters ------------------------------------------------------------


def _plan(request: HttpRequest, response: HttpResponseBase) -> tuple[MeterSpec, ...] | None:
    """The rules to meter this response with, or None when it meters nothing (usage
    headers are then removed and request.meter closed)."""
    try:
        specs = _matching_specs(request)
    except Exception as exc:
        # fails alike at every request until the settings change: one line a minute,
        # the traceback at debug level
        _rules_unusable.log(
            logging.ERROR,
            "METER['RULES'] cannot be used: no rule metered this request: %s: %s",
            type(exc).__name__,
            exc,
        )
        logger.debug("METER['RULES'] cannot be used", exc_info=True)
        specs = ()
    if response.status_code not in success_statuses():
        pop_headers(specs, response)
        _close_usage(request)
        return None
    return specs


def _collect(
    request: HttpRequest,
    response: HttpResponseBase,
    specs: tuple[MeterSpec, ...],
    headers: dict[str, str | None] | None = None,
) -> list[Entry]:
    """Usage of this request (usage callables included: they may query the database),
    with usage headers removed; request.meter is closed."""
    entries = usage_of(specs, request, response, headers)
    usage = _usage(request)
    # (usage the view added to a HEAD or OPTIONS request, which gives the caller no
    # result, is billed only when a rule names that method: see meter_core.rules)
    if usage is not None and (specs or request.method not in METHODS_WITHOUT_RESULT):
        added = [(m, n, md) for m, n, md in usage.entries if n]
        both = {m for m, _, _ in entries} & {m for m, _, _ in added}
        if both:  # (a @meter view under a rule for its meter: billed twice, say so)
            _billed_by_both.log(
                logging.WARNING,
                "%s %s: %s billed by both a METER['RULES'] rule and the view (@meter or "
                "request.meter.add()), so twice for this request; keep one of them",
                request.method,
                request.path,
                ", ".join(sorted(both)),
                key=(request.method, tuple(sorted(both))),
            )
        entries.extend(added)
    _close_usage(request)
    return entries


def _collect_and_record(
    request: HttpRequest,
    response: HttpResponseBase,
    specs: tuple[MeterSpec, ...],
    headers: dict[str, str | None] | None = None,
) -> None:
    """Sync code only (resolvers and usage callables may query the database)."""
    try:
        entries = _collect(request, response, specs, headers)
        if entries:
            record_request(request, entries)
    except Exception as exc:
        log_failure(
            _record_failed,
            logging.ERROR,
            exc,
            "metering of %s %s failed: usage not recorded",
            request.method,
            request.path,
        )


def _defer_to_stream_end(
    request: HttpRequest, response: HttpResponseBase, specs: tuple[MeterSpec, ...]
) -> bool:
    """A streaming response is metered once its body has been sent in full: usage added
    while it streams is billed, and a stream cut short (the client left, the body
    raised) bills nothing, as in meter_asgi. Its usage headers leave with its first
    bytes, so they are removed now. A FileResponse the server sends itself
    (wsgi.file_wrapper) is metered now: its body adds no usage. Returns False when the
    response is not such a stream."""
    if not isinstance(response, StreamingHttpResponse):
        return False
    if getattr(response, "file_to_stream", None) is not None:
        return False
    headers = pop_headers(specs, response)
    content = response.streaming_content
    if response.is_async:

        async def done_async() -> None:
            usage = _usage(request)
            if not specs and not (usage is not None and usage.entries):
                _close_usage(request)  # nothing to meter: no thread switch
                return
            await sync_to_async(_collect_and_record, thread_sensitive=True)(
                request, response, specs, headers
            )

        response.streaming_content = _astream(cast(AsyncIterator[bytes], content), done_async)
    else:
        response.streaming_content = _stream(
            cast(Iterator[bytes], content),
            lambda: _collect_and_record(request, response, specs, headers),
        )
    return True


def _stream(content: Iterator[bytes], done: Callable[[], None]) -> Iterator[bytes]:
    # consumed by the server's thread (WSGI), or by Django's sync_to_async (ASGI):
    # sync code either way. Not reached when the consumer stops early (close()).
    yield from content
    done()


async def _astream(
    content: AsyncIterator[bytes], done: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    async for part in content:
        yield part
    await done()


def _metered_by_another(request: HttpRequest, middleware: MeterMiddleware) -> bool:
    """Whether another MeterMiddleware (MIDDLEWARE lists it twice) meters this request:
    the inner one then passes it through, so that it is not billed twice under two event
    ids (system check E014 reports the setting)."""
    other = getattr(request, _METERED_BY, None)
    if other is None:
        setattr(request, _METERED_BY, middleware)
        return False
    if other is middleware:  # (the same instance again: an internal redirect)
        return False
    _listed_twice.log(
        logging.ERROR,
        "MeterMiddleware is listed more than once in MIDDLEWARE: requests are metered by "
        "the first only; remove the others (manage.py check: meter_django.E014)",
    )
    return True


def _log_internal_error(request: HttpRequest, exc: Exception) -> None:
    log_failure(
        _internal_error,
        logging.ERROR,
        exc,
        "metering of %s %s failed",
        request.method,
        request.path,
    )


class MeterMiddleware:
    """Meters successful responses by rule, by ``request.meter`` and by ``@meter``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse | AsyncGetResponse) -> None:
        if not apps.is_installed("meter_django"):
            # Raised as the server loads its middleware (at start-up), as Django's own
            # middleware does for what it needs: without the app there are no system
            # checks to say so, and each request would log a traceback instead.
            raise ImproperlyConfigured(
                "meter_django.middleware.MeterMiddleware needs 'meter_django' in "
                "INSTALLED_APPS (its settings checks, its failure store table and its "
                "exit hooks come with the app); add it, then run manage.py migrate"
            )
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if _metered_by_another(request, self):
            return self.get_response(request)  # (a coroutine in async mode)
        if self.async_mode:
            return self.__acall__(request)
        _attach(request)
        response = cast(HttpResponseBase, self.get_response(request))
        try:
            specs = _plan(request, response)
            if specs is not None and not _defer_to_stream_end(request, response, specs):
                _collect_and_record(request, response, specs)
        except Exception as exc:
            _log_internal_error(request, exc)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        _attach(request)
        response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        try:
            specs = _plan(request, response)
            if specs is None or _defer_to_stream_end(request, response, specs):
                return response
            if any(callable(spec.usage) for spec in specs):
                # a usage callable may query the database (request.user too): collect
                # and record in one sync call
                await sync_to_async(_collect_and_record, thread_sensitive=True)(
                    request, response, specs
                )
                return response
            entries = _collect(request, response, specs)
            if entries:
                # resolving the tenant may query the database (request.user)
                await sync_to_async(record_request, thread_sensitive=True)(request, entries)
        except Exception as exc:
            _log_internal_error(request, exc)
        return response
