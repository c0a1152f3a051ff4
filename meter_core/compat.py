"""Drop-in replacements for meter-lib 0.1.0's two functions.

Same signatures, same wire format, same contract: the proxy's JSON on success, ``None``
on any network error, non-2xx answer, record error or failed customer lookup; never an
exception for those. What changes is under the hood: calls with the same configuration
share one client (a pooled HTTP session and the customer cache), the internal lookup URL
works, the tenant is percent-encoded, each record carries an ``event_id``, and errors go
to the ``meter.compat`` logger instead of stdout. Without ``portal_url``, the customer
lookup goes to ``METER_INTERNAL_URL`` when that variable is set (the local backend, a
staging cluster), else to the in-cluster service, as meter-lib meant to.

One difference is on purpose: arguments that meter-lib would have sent as garbage (a
meter id not in the catalog, a negative or non-int usage, a timestamp in seconds, no
session time) raise :class:`~meter_core.InvalidEvent` at once. Metadata is turned into
strings as meter-lib did, and a float time in milliseconds into an int. The portal is
used only when both ``portal_url`` and ``api_key`` are set, as in meter-lib. Customer
ids are cached (``METER_CUSTOMER_CACHE_TTL``, 300 s); "no account" is not, unless
``METER_NEGATIVE_CACHE_TTL`` says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from typing import Any

from meter_core.client import MeterClient
from meter_core.config import CLIENT_OPTIONS, Secret, options_from_env
from meter_core.errors import ConfigurationError, DeliveryError, InvalidEvent

__all__ = ["post_ai_meter_usage", "post_meter_usage"]

logger = logging.getLogger("meter.compat")

_TIMEOUT = 10.0
_clients: dict[tuple[str, str | None, Secret | None, str | None], MeterClient] = {}
_clients_lock = threading.Lock()


def _client(kafka_url: str, portal_url: str | None, secret: Secret | None) -> MeterClient:
    internal_url = CLIENT_OPTIONS["internal_url"].env_value(os.environ)  # (blank: unset)
    key = (kafka_url, portal_url, secret, internal_url)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = MeterClient(
                    kafka_url,
                    portal_url,
                    secret,
                    timeout=_TIMEOUT,
                    internal_url=internal_url or CLIENT_OPTIONS["internal_url"].default,
                    **_cache_ttls(),
                )
    return client


def _cache_ttls() -> dict[str, Any]:
    """The lookup cache's lifetimes: ``METER_CUSTOMER_CACHE_TTL`` (300 s by default, as
    for a client) and ``METER_NEGATIVE_CACHE_TTL``, which defaults to 0 here: meter-lib
    asked at every call, so a tenant given an account is billed at its next call, not
    after a cached "no account" expires."""
    try:
        env = options_from_env(
            {k: v for k, v in os.environ.items()
             if k in ("METER_CUSTOMER_CACHE_TTL", "METER_NEGATIVE_CACHE_TTL")}
        )  # fmt: skip
    except ConfigurationError as exc:  # a bad tuning variable must not stop every call
        logger.warning("%s: the default cache lifetimes are used", exc)
        env = {}
    return {"negative_cache_ttl": 0.0, **env}


def _client_or_none(kafka_url: str, portal_url: str | None, api_key: object) -> MeterClient | None:
    # meter-lib returned None for a malformed URL (requests raised, it printed); so do we,
    # with an ERROR log line: a missing environment variable must not break a request.
    # A key that is not a str is refused the same way.
    try:
        secret = _secret(api_key)
        del api_key  # from here on only the wrapped Secret exists in this frame
        if not (portal_url and secret is not None):
            # meter-lib used the portal only with both set, and ignored either alone
            # (an empty PORTAL_URL variable in an in-cluster service): so do we.
            portal_url = secret = None
        return _client(kafka_url, portal_url, secret)
    except ConfigurationError as exc:
        logger.error("meter usage not posted: %s", exc)
        return None


def _secret(api_key: object) -> Secret | None:
    """The key as a Secret (a Secret given is used as is). Raises ConfigurationError,
    without the value, for a key that is not a str (bytes would be sent as "b'...'"); a
    str that cannot go into a header is refused, unshown, when the client is built."""
    if isinstance(api_key, Secret):
        return api_key
    if isinstance(api_key, str):
        return Secret(api_key) if api_key else None
    if not api_key:
        return None
    raise ConfigurationError(f"api_key: must be a str, got {type(api_key).__name__}")


def _stringify(metadata: Mapping[str, Any] | None) -> dict[str, str] | None:
    """Metadata as meter-lib sent it: values through ``str()``, keys as ``json.dumps``
    writes them (``1`` -> ``"1"``, ``True`` -> ``"true"``, ``None`` -> ``"null"``)."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidEvent("metadata", f"must be a mapping, got {metadata!r}")
    return {_json_key(k): str(v) for k, v in metadata.items()}


def _json_key(key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, int, float)) or key is None:
        text: str = json.dumps({key: 0})
        return str(json.loads(text).popitem()[0])
    raise InvalidEvent("metadata", f"keys must be str, int, float, bool or None, got {key!r}")


def _milliseconds(value: Any) -> Any:
    """A float time in milliseconds (``time.time() * 1000``, which meter-lib sent as is)
    as the integer the wire protocol asks for; anything else unchanged (and checked)."""
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return value


def post_meter_usage(
    tenant_id: str,
    device_id: str,
    meter_id: str,
    kafka_url: str,
    total_usage: int,
    portal_url: str | None = None,
    api_key: str | None = None,
    timestamp: int | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Post one usage event synchronously (meter-lib 0.1.0 compatible).

    Returns the proxy's JSON, or None when the customer lookup fails or finds no
    account, the network fails, or the backend answers an error. Raises InvalidEvent for
    invalid arguments; a malformed URL is logged and gives None, as in meter-lib.
    """
    client = _client_or_none(kafka_url, portal_url, api_key)
    del api_key
    if client is None:
        return None
    event = client.event(
        tenant_id=tenant_id, device_id=device_id, meter_id=meter_id,
        total_usage=total_usage, metadata=_stringify(metadata),
        timestamp=_milliseconds(timestamp),
    )  # fmt: skip
    try:
        return client.send_event(event)
    except DeliveryError as exc:
        logger.error("meter usage %s for tenant %r not posted: %s", meter_id, tenant_id, exc)
        return None


def post_ai_meter_usage(
    tenant_id: str,
    device_id: str,
    meter_id: str,
    kafka_url: str,
    portal_url: str | None = None,
    api_key: str | None = None,
    start_time: int | None = None,
    end_time: int | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Post one AI session start or end event synchronously (meter-lib 0.1.0 compatible).

    Exactly one of ``start_time`` / ``end_time`` must be given (meter-lib ignored a
    falsy one, as this does). Returns the proxy's JSON or None, as :func:`post_meter_usage`.
    """
    client = _client_or_none(kafka_url, portal_url, api_key)
    del api_key
    if client is None:
        return None
    event = client.session_event(
        tenant_id=tenant_id, device_id=device_id, meter_id=meter_id,
        start_time=_milliseconds(start_time) or None, end_time=_milliseconds(end_time) or None,
        metadata=_stringify(metadata),
    )  # fmt: skip
    try:
        return client.send_event(event)
    except DeliveryError as exc:
        logger.error("AI meter event %s for tenant %r not posted: %s", meter_id, tenant_id, exc)
        return None


def _reset_for_tests() -> None:
    with _clients_lock:
        _clients.clear()
