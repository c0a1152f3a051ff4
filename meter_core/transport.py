"""Transports: the one place that talks to the backend.

A transport does two things, each one request: look a tenant's customer id up, and
produce a list of records. Everything above it (cache, batching, retries, stores) is
I/O-free and is tested with :class:`MemoryTransport`; :class:`HTTPTransport` is tested
against the real local backend.

- :class:`HTTPTransport`: production. One pooled ``requests.Session`` per transport.
- :class:`MemoryTransport`: keeps records in memory; for tests (ours and users').
- :class:`LogTransport`: logs each record on ``meter.transport``; for development.
"""

from __future__ import annotations

import html
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError

from meter_core.config import (
    CLIENT_OPTIONS,
    DEFAULT_INTERNAL_URL,
    Secret,
    coerce_option,
    redact_url,
)
from meter_core.deadlines import DeadlineAdapter, deadline_for
from meter_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    CustomerNotFound,
    DeliveryRejected,
)
from meter_core.http_retries import ConnectionRetry, quiet_urllib3_retry_lines
from meter_core.wire import (
    PRODUCE_HEADERS,
    ProduceResult,
    RecordResult,
    encode_records,
    join_encoded_records,
    parse_customer_account,
    parse_produce_response,
)

__all__ = ["HTTPTransport", "LogTransport", "MemoryTransport", "Transport"]

logger = logging.getLogger("meter.transport")

CustomerId = Any  # a str or int, exactly as the lookup API returned it

# The most of an answer read: a lookup answer is an account (some hundred bytes), a
# produce answer an offsets entry per record (some 80 bytes each). A larger one is a
# malformed reply, and must not fill the app's memory.
MAX_LOOKUP_ANSWER = 1 << 20
MAX_PRODUCE_ANSWER = 16 << 20


class _AnswerTooLarge(Exception):
    pass


def _read_capped(response: requests.Response, limit: int) -> bytes:
    """The body of a streamed ``response``, read up to ``limit`` bytes; a longer one
    (by its Content-Length, or as read) raises _AnswerTooLarge without reading on."""
    length = response.headers.get("Content-Length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise _AnswerTooLarge(f"an answer of {int(length):,} bytes")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _AnswerTooLarge(f"an answer of more than {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@runtime_checkable
class Transport(Protocol):
    """What the client needs from the backend. Implementations must be thread-safe.

    A transport may also offer ``produce_encoded(records: Sequence[str]) ->
    ProduceResult``, taking records already encoded as JSON text (by
    :class:`~meter_core.wire.RecordEncoder`); the sender then uses it instead of
    :meth:`produce`, which saves building a dict per record. :class:`HTTPTransport` does.

    It may also have ``lookup_concurrency``, an int: how many :meth:`lookup_customer`
    calls a delivery attempt may make at once (from as many threads) when several
    tenants are not in the customer cache. Without it, one at a time.
    """

    def lookup_customer(self, tenant_id: str) -> CustomerId:
        """The customer id of ``tenant_id``. Raises CustomerNotFound when the tenant has no
        account, other DeliveryError subclasses when the lookup failed."""
        ...

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        """Send records (``{"key":..., "value":...}``) in one request. Returns the per-record
        results of a 2xx answer; raises a DeliveryError for a failure of the whole request."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...


class _BearerAuth(requests.auth.AuthBase):
    """Adds the Authorization header at send time, so the key sits in no dict of ours."""

    def __init__(self, secret: Secret) -> None:
        self.secret = secret

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = "Bearer " + self.secret.reveal()
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(********)"


def _describe(exc: BaseException) -> str:
    """A short, stable description of a network error (no object addresses), so stored
    events that failed for the same reason group together.

    A timeout anywhere in the cause chain is ``"timed out"``: a lookup whose tries all
    timed out reaches us from urllib3's retries as a ``requests.ConnectionError``."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        # urllib3's NewConnectionError (a refused or failed connection) subclasses
        # ConnectTimeoutError for backward compatibility: it is not a timeout.
        # socket.timeout is TimeoutError, which is also an OS-level ETIMEDOUT.
        if isinstance(cause, ConnectTimeoutError) and not isinstance(cause, NewConnectionError):
            return "timed out"
        if isinstance(cause, (ReadTimeoutError, requests.Timeout, TimeoutError)):
            return "timed out"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, socket.gaierror):
            return "host name not resolved"
        nested = [a for a in getattr(cause, "args", ()) if isinstance(a, BaseException)]
        reason = getattr(cause, "reason", None)
        cause = (
            reason
            if isinstance(reason, BaseException)
            else nested[0]
            if nested
            else cause.__cause__ or cause.__context__
        )
    return type(exc).__name__


def _secret_forms(secret: str) -> list[str]:
    """The ways ``secret`` can appear in a text: as is, escaped in a JSON string (with
    and without ``\\/``, and with ``<>&`` as ``\\u003c``... as some servers write them),
    escaped for HTML, escaped by ``repr``; longest first."""
    json_form = json.dumps(secret)[1:-1]
    unicode_escaped = (
        json_form.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    )
    forms = {secret, json_form, json_form.replace("/", "\\/"), unicode_escaped,
             html.escape(secret), repr(secret)[1:-1]}  # fmt: skip
    return sorted(forms, key=len, reverse=True)


def _scrub_text(text: str, forms: list[str]) -> str:
    for form in forms:
        text = text.replace(form, "***")
    return text


def _scrub_body(body: bytes, secret: str) -> bytes:
    """``body`` without ``secret`` in any of its forms: scrubbed before the answer is
    read, so that an error message that quotes the body only in part (it is cut to a
    few hundred characters) cannot show part of the key either."""
    if not secret:
        return body
    for form in _secret_forms(secret):
        body = body.replace(form.encode("ascii", "backslashreplace"), b"***")
    return body


def _scrub(exc: BaseException, secret: str) -> None:
    """Replace ``secret`` (in any of its forms) by ``***`` in the text arguments of
    ``exc`` and of the exceptions it was raised from (what its message and traceback
    show)."""
    if not secret:
        return
    forms = _secret_forms(secret)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        args = current.args
        if any(isinstance(a, str) and any(f in a for f in forms) for a in args):
            current.args = tuple(_scrub_text(a, forms) if isinstance(a, str) else a for a in args)
        current = current.__cause__ or current.__context__


_HEADER_SPACE = frozenset(" \t\n\r\x0b\x0c")  # (what HTTP trims and the library refuses)


def _header_value(text: str) -> str | bytes:
    return text if text.isascii() else text.encode("utf-8")


class HTTPTransport:
    """Talks HTTP to the lookup API and the Kafka REST Proxy through one pooled session.

    External lookup (``portal_url`` and ``api_key`` both set) or internal lookup,
    exactly as the wire protocol describes; the tenant is percent-encoded in the path.
    Lookups (idempotent GETs) are retried twice on connection errors and 502/503/504 by
    urllib3; produce requests are never retried here (the sender decides).

    Every argument is checked here, with the rules of the client options of the same
    names (:data:`~meter_core.CLIENT_OPTIONS`), and a bad one raises
    :class:`~meter_core.ConfigurationError` naming it: URLs must be http(s) URLs with a
    host (a value that is not a URL is not shown), ``timeout`` a number of seconds from
    0.001 to 86400, ``pool_maxsize`` an int >= 1. ``api_key`` may be a
    :class:`~meter_core.Secret` or a plain ``str``, which is checked (printable ASCII,
    no whitespace at its ends) and wrapped in a Secret at once; an empty key means none.
    """

    def __init__(
        self,
        kafka_url: str,
        portal_url: str | None = None,
        api_key: Secret | str | None = None,
        *,
        internal_url: str = DEFAULT_INTERNAL_URL,
        topic: str = "usage-events",
        timeout: float = 10.0,
        pool_maxsize: int = 10,
    ) -> None:
        secret: Secret | None = coerce_option(CLIENT_OPTIONS["api_key"], api_key)
        del api_key  # from here on only the wrapped Secret exists in this frame
        kafka_url = coerce_option(CLIENT_OPTIONS["kafka_url"], kafka_url)
        portal_url = coerce_option(CLIENT_OPTIONS["portal_url"], portal_url)
        internal_url = coerce_option(CLIENT_OPTIONS["internal_url"], internal_url)
        topic = coerce_option(CLIENT_OPTIONS["topic"], topic)
        if not topic.strip():
            raise ConfigurationError(f"topic: must be a non-empty str, got {topic!r}")
        timeout = coerce_option(CLIENT_OPTIONS["timeout"], timeout)
        if isinstance(pool_maxsize, bool) or not isinstance(pool_maxsize, int) or pool_maxsize < 1:
            raise ConfigurationError(f"pool_maxsize: must be an int >= 1, got {pool_maxsize!r}")
        self._produce_url = f"{kafka_url}/topics/{quote(topic, safe='')}"
        if portal_url and secret:
            self._lookup_base = f"{portal_url}/metering/v1alpha1/customer-accounts/tenant/"
            self._auth: _BearerAuth | None = _BearerAuth(secret)
        else:
            self._lookup_base = f"{internal_url}/v1alpha1/customer-accounts/tenant/"
            self._auth = None
        self._timeout = timeout
        self._pool_maxsize = pool_maxsize
        self._pid = os.getpid()
        self._produce_base: tuple[requests.PreparedRequest, dict[str, Any]] | None = None
        self._session = self._new_session()

    def _new_session(self) -> requests.Session:
        self._produce_base = None
        session = requests.Session()
        quiet_urllib3_retry_lines()  # (see meter_core.http_retries)
        retry = ConnectionRetry(
            total=2,
            connect=2,
            read=2,
            status=2,
            other=0,
            backoff_factor=0.1,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            respect_retry_after_header=False,
        )
        # (each try of a request must end within two timeouts, its answer read: see
        # meter_core.deadlines)
        adapter = DeadlineAdapter(
            pool_connections=4, pool_maxsize=self._pool_maxsize, max_retries=retry
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    @property
    def session(self) -> requests.Session:
        """This process's pooled session (a forked child gets its own: sockets inherited
        from the parent are never used, by any thread)."""
        pid = os.getpid()
        if self._pid != pid:
            # The new session is in place before the pid says so: another thread of the
            # child (lookups run several at a time) must not take the parent's meanwhile.
            # Two threads here at once each make one; either is the child's own.
            session = self._session = self._new_session()
            self._pid = pid
            return session
        return self._session

    @property
    def lookup_concurrency(self) -> int:
        """Customer lookups a delivery attempt makes at once: half the connection pool
        (``pool_maxsize``), at most 8, so that the sender and a resend of failed events,
        each looking up at once, stay within the pool (urllib3 warns for each connection
        it has to discard)."""
        return max(1, min(8, self._pool_maxsize // 2))

    @property
    def external_lookup(self) -> bool:
        """True when lookups go to the portal with the API key."""
        return self._auth is not None

    def __repr__(self) -> str:
        mode = "external" if self._auth else "internal"
        return (
            f"HTTPTransport(produce={redact_url(self._produce_url)!r}, "
            f"lookup={redact_url(self._lookup_base)!r}, mode={mode!r})"
        )

    def lookup_customer(self, tenant_id: str) -> CustomerId:
        try:
            return self._lookup_customer(tenant_id)
        except Exception as exc:
            if self._auth is not None:
                # A portal that quotes the Authorization header in its error body (or an
                # HTTP library quoting it in an error): the key must not reach the message,
                # which is logged and stored.
                _scrub(exc, self._auth.secret.reveal())
            raise

    def _lookup_customer(self, tenant_id: str) -> CustomerId:
        if self._auth is not None and (
            tenant_id[:1] in _HEADER_SPACE or tenant_id[-1:] in _HEADER_SPACE
        ):
            # A header value cannot start with a space (the HTTP library refuses it) and
            # loses one at its end (servers trim it, then the header and the path name
            # different tenants): final, so that the event is not retried for nothing.
            raise DeliveryRejected(
                f"customer lookup of {tenant_id!r}: a tenant id that starts or ends with "
                "whitespace cannot be sent in the portal's x-tenant-id header"
            )
        url = self._lookup_base + quote(tenant_id, safe="")
        headers = {"x-tenant-id": _header_value(tenant_id)} if self._auth else None
        what = f"customer lookup of {tenant_id!r} at {redact_url(url)}"
        response, body = self._exchange(
            what,
            lambda: self.session.get(
                url, headers=headers, auth=self._auth, timeout=self._timeout, stream=True
            ),
            MAX_LOOKUP_ANSWER,
        )
        if self._auth is not None and not 200 <= response.status_code < 300:
            # (an error answer may quote the key it was sent; a 2xx is read as it is:
            # scrubbing a short key out of it would change the customer id read)
            body = _scrub_body(body, self._auth.secret.reveal())
        return parse_customer_account(response.status_code, response.headers, body, tenant_id)

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        return self._post_records(encode_records(records), len(records))

    def produce_encoded(self, records: Sequence[str]) -> ProduceResult:
        """:meth:`produce` for records already encoded as JSON text."""
        return self._post_records(join_encoded_records(records), len(records))

    def _post_records(self, body: bytes, count: int) -> ProduceResult:
        what = f"produce to {redact_url(self._produce_url)}"

        def send() -> requests.Response:
            session = self.session
            base = self._produce_base
            if base is None:
                base = self._produce_base = self._prepare_produce(session)
            template, settings = base
            request = template.copy()
            request.prepare_body(body, None)
            return session.send(request, timeout=self._timeout, **settings)

        response, answer = self._exchange(what, send, MAX_PRODUCE_ANSWER)
        if response.history and response.request.method != "POST":
            # a 301, 302 or 303 on the way turned the POST into a GET: nothing was written
            moved = response.history[0]
            raise BackendUnavailable(
                f"{what} was redirected (HTTP {moved.status_code} to "
                f"{redact_url(response.url)}), which turns the POST "
                "into a GET: set the Kafka URL to where it redirects"
            )
        return parse_produce_response(response.status_code, response.headers, answer, count)

    def _exchange(
        self, what: str, send: Callable[[], requests.Response], limit: int
    ) -> tuple[requests.Response, bytes]:
        """The answer to ``send()`` (a streamed request, tried by urllib3 as its retries
        say) and its body, read up to ``limit`` bytes, each try within the whole-try
        deadline; every failure as BackendUnavailable."""
        with deadline_for(self._try_seconds) as deadline:
            try:
                response = send()
                with response:
                    body = _read_capped(response, limit)
                    deadline.end()  # (before the connection goes back to the pool)
                if deadline.cut:  # (cut in its headers: http.client read an empty answer)
                    raise self._failure(what, None, cut=True)
            except _AnswerTooLarge as exc:
                raise BackendUnavailable(f"{what} gave a malformed reply: {exc}") from None
            except requests.Timeout as exc:
                raise BackendUnavailable(f"{what} timed out after {self._timeout:g}s") from exc
            except requests.RequestException as exc:
                raise self._failure(what, exc, cut=deadline.cut) from exc
        return response, body

    @property
    def _try_seconds(self) -> float:
        """How long one try of a request may take, its answer read: a connect and a
        read timeout (the sum the lease of stored events counts on)."""
        return 2 * self._timeout

    def _failure(self, what: str, exc: BaseException | None, *, cut: bool) -> BackendUnavailable:
        if cut:
            return BackendUnavailable(
                f"{what} gave no whole answer within {self._try_seconds:g}s "
                "(it answered too slowly): cut off"
            )
        assert exc is not None
        return BackendUnavailable(f"{what} failed: {_describe(exc)}")

    def _prepare_produce(
        self, session: requests.Session
    ) -> tuple[requests.PreparedRequest, dict[str, Any]]:
        """The produce request without its body, and the session's settings from the
        environment (proxies, CA bundle), both made once per session: ``session.post``
        would read the environment and ``~/.netrc`` again for every batch."""
        template = session.prepare_request(
            requests.Request("POST", self._produce_url, headers=dict(PRODUCE_HEADERS))
        )
        settings = session.merge_environment_settings(self._produce_url, {}, None, None, None)
        return template, {**settings, "stream": True}  # (the answer is read capped)

    def close(self) -> None:
        self._session.close()


def _default_customer(tenant_id: str) -> str:
    return f"cust-{tenant_id}"


class MemoryTransport:
    """Accepts every record and keeps it in :attr:`records`; no network.

    ``customers`` maps tenants to customer ids (a mapping or a callable); a tenant
    missing from a mapping has no account. By default every tenant is ``cust-<tenant>``.
    """

    def __init__(
        self, customers: Mapping[str, CustomerId] | Callable[[str], CustomerId] | None = None
    ) -> None:
        self._customers = customers if customers is not None else _default_customer
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.lookups: list[str] = []

    def lookup_customer(self, tenant_id: str) -> CustomerId:
        with self._lock:
            self.lookups.append(tenant_id)
        if callable(self._customers):
            return self._customers(tenant_id)
        try:
            return self._customers[tenant_id]
        except KeyError:
            raise CustomerNotFound(f"no customer account for tenant {tenant_id!r}") from None

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        with self._lock:
            start = len(self.records)
            self.records.extend(dict(r) for r in records)
        results = tuple(RecordResult(partition=0, offset=start + i) for i in range(len(records)))
        return ProduceResult(
            body={"offsets": [{"offset": r.offset} for r in results]}, records=results
        )

    def values(self) -> list[dict[str, Any]]:
        """The values of every record produced so far."""
        with self._lock:
            return [r["value"] for r in self.records]

    def close(self) -> None:
        pass


class LogTransport:
    """Logs each record on the ``meter.transport`` logger at INFO instead of sending it,
    and keeps nothing. Customer ids are ``cust-<tenant>``. Nothing leaves the process."""

    def lookup_customer(self, tenant_id: str) -> CustomerId:
        return _default_customer(tenant_id)

    def produce(self, records: Sequence[Mapping[str, Any]]) -> ProduceResult:
        for record in records:
            logger.info("usage record %s", record.get("value"))
        return ProduceResult(body={}, records=tuple(RecordResult() for _ in records))

    def close(self) -> None:
        pass
