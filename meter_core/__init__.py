"""meter_core: the framework-free client of the Litewave metering backend.

Quick start::

    from meter_core import MeterClient

    client = MeterClient.from_env()            # METER_KAFKA_URL, METER_PORTAL_URL, ...
    client.record(tenant_id="acme", device_id="web-1",
                  meter_id="page.processed.basic", total_usage=3)
    client.flush()

Migrating from meter-lib: ``from meter_core import post_meter_usage, post_ai_meter_usage``.
"""

from meter_core.capture import CapturedEvents, capture_events
from meter_core.catalog import METERS, Meter, is_known_meter, register_meter
from meter_core.client import MeterClient
from meter_core.compat import post_ai_meter_usage, post_meter_usage
from meter_core.config import CLIENT_OPTIONS, ClientOption, Secret
from meter_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    CustomerNotFound,
    DeliveryError,
    DeliveryRejected,
    InvalidEvent,
    MeterError,
    RateLimited,
    StoreError,
)
from meter_core.events import MAX_USAGE, UsageEvent, now_ms, validate_identifier
from meter_core.reasons import group_reasons
from meter_core.redeliver import RedeliveryReport, describe_leased, describe_not_due, redeliver
from meter_core.retry import RetryPolicy
from meter_core.rules import (
    METHODS_WITHOUT_RESULT,
    MeterSpec,
    RouteRules,
    decode_header_value,
    normalize_template,
    parse_usage_header,
)
from meter_core.spool import SQLiteSpool
from meter_core.store import FailureStore, MemoryFailureStore, StoredEvent
from meter_core.transport import HTTPTransport, LogTransport, MemoryTransport, Transport
from meter_core.usage import LogThrottle, RequestUsage
from meter_core.wire import ProduceResult, RecordResult

__version__ = "0.1.0"

__all__ = [
    "CLIENT_OPTIONS",
    "MAX_USAGE",
    "METERS",
    "METHODS_WITHOUT_RESULT",
    "BackendUnavailable",
    "CapturedEvents",
    "ClientOption",
    "ConfigurationError",
    "CustomerNotFound",
    "DeliveryError",
    "DeliveryRejected",
    "FailureStore",
    "HTTPTransport",
    "InvalidEvent",
    "LogThrottle",
    "LogTransport",
    "MemoryFailureStore",
    "MemoryTransport",
    "Meter",
    "MeterClient",
    "MeterError",
    "MeterSpec",
    "ProduceResult",
    "RateLimited",
    "RecordResult",
    "RedeliveryReport",
    "RequestUsage",
    "RetryPolicy",
    "RouteRules",
    "SQLiteSpool",
    "Secret",
    "StoreError",
    "StoredEvent",
    "Transport",
    "UsageEvent",
    "__version__",
    "capture_events",
    "decode_header_value",
    "describe_leased",
    "describe_not_due",
    "group_reasons",
    "is_known_meter",
    "normalize_template",
    "now_ms",
    "parse_usage_header",
    "post_ai_meter_usage",
    "post_meter_usage",
    "redeliver",
    "register_meter",
    "validate_identifier",
]
