"""The REST Proxy v2 wire format: request bodies and the reading of answers.

Pure functions, no I/O: :mod:`meter_core.transport` does the HTTP and hands the status,
headers and body here. Reading is strict about what the proxy promises (one ``offsets``
entry per record, in order) and turns every way an answer can be wrong into a
:class:`~meter_core.DeliveryError` subclass, never a ``JSONDecodeError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from meter_core.errors import (
    BackendUnavailable,
    CustomerNotFound,
    DeliveryError,
    DeliveryRejected,
    RateLimited,
)
from meter_core.events import UsageEvent
from meter_core.retry import parse_retry_after

__all__ = [
    "PRODUCE_HEADERS",
    "ProduceResult",
    "RecordEncoder",
    "RecordResult",
    "encode_records",
    "error_for_status",
    "join_encoded_records",
    "parse_customer_account",
    "parse_produce_response",
]

PRODUCE_CONTENT_TYPE = "application/vnd.kafka.json.v2+json"
PRODUCE_HEADERS: Mapping[str, str] = {
    "Content-Type": PRODUCE_CONTENT_TYPE,
    "Accept": "application/vnd.kafka.v2+json, application/json",
}
# Per-record codes that will fail the same way again (50002: e.g. record too large).
_NON_RETRIABLE_RECORD_CODES = frozenset({50002})


class RecordResult(NamedTuple):
    """The proxy's answer for one record of a produce request (a named tuple: one is
    made per record sent, so it must be cheap)."""

    error_code: int | None = None
    error: str | None = None
    partition: int | None = None
    offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def retriable(self) -> bool:
        """Whether a failed record may succeed when sent again."""
        code = self.error_code
        return code is not None and code >= 50000 and code not in _NON_RETRIABLE_RECORD_CODES

    def as_error(self) -> DeliveryError:
        """The failure of this record as an exception (retriable or not)."""
        message = f"record error {self.error_code}: {self.error or 'no detail'}"
        if self.retriable:
            return BackendUnavailable(message, status=200, error_code=self.error_code)
        return DeliveryRejected(message, status=200, error_code=self.error_code)


class ProduceResult:
    """A 2xx produce answer: the proxy's JSON (``body``) and one :class:`RecordResult` per
    record (``records``, in request order). Immutable.

    ``count`` and ``all_ok`` are answered without building ``records``: an answer of
    :func:`parse_produce_response` whose records all succeeded (the common case, and all
    the sender needs to know of it) builds them only when they are first read.
    """

    __slots__ = ("_all_ok", "_body", "_count", "_offsets", "_records")

    _body: dict[str, Any]
    _count: int
    _records: tuple[RecordResult, ...] | None  # None: not built yet, from _offsets
    _offsets: list[dict[str, Any]]
    _all_ok: bool | None  # None: not known yet

    def __init__(self, body: dict[str, Any], records: Sequence[RecordResult]) -> None:
        records = tuple(records)
        self._init(body, len(records), records, [], None)

    @classmethod
    def _succeeded(cls, body: dict[str, Any], offsets: list[dict[str, Any]]) -> ProduceResult:
        """The answer whose ``offsets`` entries are all dicts without an error code."""
        result = cls.__new__(cls)
        result._init(body, len(offsets), None, offsets, True)
        return result

    def _init(
        self,
        body: dict[str, Any],
        count: int,
        records: tuple[RecordResult, ...] | None,
        offsets: list[dict[str, Any]],
        all_ok: bool | None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "_body", body)
        set_(self, "_count", count)
        set_(self, "_records", records)
        set_(self, "_offsets", offsets)
        set_(self, "_all_ok", all_ok)

    @property
    def body(self) -> dict[str, Any]:
        """The proxy's JSON answer."""
        return self._body

    @property
    def count(self) -> int:
        """The number of records answered: ``len(records)``."""
        return self._count

    @property
    def records(self) -> tuple[RecordResult, ...]:
        """One result per record, in request order."""
        records = self._records
        if records is None:
            ok = RecordResult._make
            records = tuple(
                [ok((None, None, e.get("partition"), e.get("offset"))) for e in self._offsets]
            )
            object.__setattr__(self, "_records", records)
        return records

    @property
    def all_ok(self) -> bool:
        """Whether every record was written."""
        all_ok = self._all_ok
        if all_ok is None:
            all_ok = all(r.ok for r in self.records)
            object.__setattr__(self, "_all_ok", all_ok)
        return all_ok

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ProduceResult is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"ProduceResult is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProduceResult) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._body == other._body and self.records == other.records

    __hash__ = None  # type: ignore[assignment]  # (unhashable, as its body is a dict)

    def __repr__(self) -> str:
        return f"ProduceResult(body={self._body!r}, records={self.records!r})"

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any], tuple[RecordResult, ...]]]:
        return self.__class__, (self._body, self.records)  # (pickle, copy)


def encode_records(records: Sequence[Mapping[str, Any]]) -> bytes:
    """The produce request body. ``json.dumps`` with its default separators, as meter-lib
    0.1.0 sent through ``requests``, so the bytes of each value are the same."""
    return json.dumps({"records": records}).encode("utf-8")


def join_encoded_records(records: Sequence[str]) -> bytes:
    """The produce request body from records already encoded by :class:`RecordEncoder`:
    the same bytes as :func:`encode_records` of the records they encode."""
    return ('{"records": [' + ", ".join(records) + "]}").encode("ascii")


_MAX_CACHED_FRAGMENTS = 10_000


class RecordEncoder:
    """Encodes the record of an event as ``json.dumps({"key": customer, "value":
    event.record_value(customer)})`` does, byte for byte, at a fraction of its cost.

    Tenants, devices, meters and customers repeat from event to event, so the JSON text
    around the per-event fields (usage, time, metadata, id) is built once per
    combination and cached (bounded). Session events are encoded by ``json.dumps``.
    Safe to share between threads (a cache miss only builds a fragment twice).
    """

    def __init__(self) -> None:
        self._fragments: dict[tuple[Any, str, str, str], tuple[str, str]] = {}

    def encode(self, event: UsageEvent, customer: Any) -> str:
        """The JSON text of the record (ASCII only: non-ASCII is escaped)."""
        if event.total_usage is None or type(customer) not in (str, int):
            return json.dumps({"key": customer, "value": event.record_value(customer)})
        key = (customer, event.meter_id, event.tenant_id, event.device_id)
        fragments = self._fragments.get(key)
        if fragments is None:
            fragments = self._build(key)
        head, tail = fragments
        metadata = event.metadata
        meta = json.dumps(dict(metadata)) if metadata else "{}"
        return (
            f'{head}{event.total_usage}, "event_time": {event.event_time}, '
            f'"metadata": {meta}, "event_id": "{event.event_id}{tail}'
        )

    def _build(self, key: tuple[Any, str, str, str]) -> tuple[str, str]:
        customer, meter_id, tenant_id, device_id = key
        c = json.dumps(customer)
        m = json.dumps(meter_id)
        head = f'{{"key": {c}, "value": {{"meter_id": {m}, "customer_id": {c}, "total_usage": '
        tail = f'", "tenant_id": {json.dumps(tenant_id)}, "device_id": {json.dumps(device_id)}}}}}'
        if len(self._fragments) >= _MAX_CACHED_FRAGMENTS:
            self._fragments.clear()
        self._fragments[key] = (head, tail)
        return head, tail


def _describe_body(content_type: str, body: bytes) -> str:
    text = body[:120].decode("utf-8", "replace")
    text = " ".join(text.split())
    return f"non-JSON body ({content_type or 'no content type'}): {text!r}"


def _decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def error_for_status(
    status: int, headers: Mapping[str, str], body: bytes, *, what: str
) -> DeliveryError:
    """The exception for a non-2xx answer: 429 -> RateLimited, 408 and 5xx ->
    BackendUnavailable, other 4xx -> DeliveryRejected. ``what`` names the request."""
    content_type = headers.get("Content-Type", "")
    data = _decode_json(body)
    error_code: int | None = None
    if isinstance(data, dict):
        code = data.get("error_code")
        error_code = code if isinstance(code, int) and not isinstance(code, bool) else None
        detail = str(data.get("message") or data.get("error") or data)[:200]
    else:
        detail = _describe_body(content_type, body)
    message = f"{what} failed: HTTP {status}: {detail}"
    if status == 429:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        return RateLimited(message, error_code=error_code, retry_after=retry_after)
    if status == 408 or status >= 500:
        return BackendUnavailable(message, status=status, error_code=error_code)
    return DeliveryRejected(message, status=status, error_code=error_code)


def parse_produce_response(
    status: int, headers: Mapping[str, str], body: bytes, record_count: int
) -> ProduceResult:
    """Read a produce answer. Returns a :class:`ProduceResult` for a well-formed 2xx
    (whose records may still have failed one by one); raises a DeliveryError otherwise.

    A 2xx whose body cannot be read raises :class:`BackendUnavailable`: the records may or
    may not have been written, and resending them with their event ids is safe.
    """
    if not 200 <= status < 300:
        raise error_for_status(status, headers, body, what="produce")
    data = _decode_json(body)
    if not isinstance(data, dict):
        raise BackendUnavailable(
            f"produce answered HTTP {status} with a malformed reply: "
            + _describe_body(headers.get("Content-Type", ""), body),
            status=status,
        )
    offsets = data.get("offsets")
    if not isinstance(offsets, list) or len(offsets) != record_count:
        got = len(offsets) if isinstance(offsets, list) else type(offsets).__name__
        raise BackendUnavailable(
            f"produce answered HTTP {status} with {got} offsets for {record_count} records",
            status=status,
        )
    for entry in offsets:  # the common answer first: every record written
        if type(entry) is not dict or entry.get("error_code") is not None:
            break
    else:
        return ProduceResult._succeeded(data, offsets)
    results: list[RecordResult] = []
    append = results.append
    ok = RecordResult._make  # (tuple.__new__: a tenth of the cost of the constructor)
    for entry in offsets:
        if type(entry) is dict and entry.get("error_code") is None:
            append(ok((None, None, entry.get("partition"), entry.get("offset"))))
            continue
        if not isinstance(entry, dict):
            results.append(RecordResult(error_code=50001, error=f"unreadable offset {entry!r}"))
            continue
        code = entry.get("error_code")
        if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
            code = 50001
        if code is None:
            results.append(RecordResult(None, None, entry.get("partition"), entry.get("offset")))
        else:
            results.append(
                RecordResult(code, entry.get("error"), entry.get("partition"), entry.get("offset"))
            )
    return ProduceResult(body=data, records=tuple(results))


def parse_customer_account(
    status: int, headers: Mapping[str, str], body: bytes, tenant: str
) -> Any:
    """The customer id of a lookup answer (an account object, or a list whose first item
    is the account). Raises CustomerNotFound for an empty list or a 404 (the only ways the
    API says "no account"), BackendUnavailable (retriable) for an answer that is not an
    account or an account without a usable ``id`` (a portal glitch must not refuse a
    tenant's events for good), and the errors of :func:`error_for_status` for other
    failures."""
    if status == 404:
        raise CustomerNotFound(f"no customer account for tenant {tenant!r} (HTTP 404)", status=404)
    if not 200 <= status < 300:
        raise error_for_status(status, headers, body, what=f"customer lookup of {tenant!r}")
    data = _decode_json(body)
    if isinstance(data, list):
        if not data:
            raise CustomerNotFound(f"no customer account for tenant {tenant!r}", status=status)
        data = data[0]
    if not isinstance(data, dict):
        raise BackendUnavailable(
            f"customer lookup of {tenant!r} gave a malformed reply: "
            + _describe_body(headers.get("Content-Type", ""), body),
            status=status,
        )
    customer_id = data.get("id")
    if (
        isinstance(customer_id, bool)
        or not isinstance(customer_id, (str, int))
        or (isinstance(customer_id, str) and not customer_id.strip())
    ):
        shown = body[:200].decode("utf-8", "replace") + ("…" if len(body) > 200 else "")
        raise BackendUnavailable(
            f"customer lookup of {tenant!r} gave a malformed reply: an account without a "
            f"usable 'id': {shown!r}",
            status=status,
        )
    return customer_id
