"""The local metering backend, for development and tests.

A real HTTP server (standard library only) that speaks both protocols of the wire
protocol: the customer lookup (external ``/metering/v1alpha1/...`` with a bearer token and
``x-tenant-id``, internal ``/v1alpha1/...``) and Kafka REST Proxy v2 produce (content-type
check, 404 for an unknown topic, 422 for malformed records, per-record offsets). It keeps
every record it writes, serves them at ``GET /_records``, and can be told to misbehave:

==================  =====================================================================
fault mode          effect (``times=N``: only the next N requests it applies to)
==================  =====================================================================
``down``            503 JSON to produce and lookups (``status=500``: another 5xx)
``html502``         502 with an HTML page to produce and lookups
``rate_limit``      429 with ``Retry-After: retry_after`` (default 1)
``slow``            wait ``delay`` seconds, then answer normally (produce and lookups)
``record_errors``   200, but records fail with ``error_code`` (default 50003): every
                    ``every``-th record counting from 1 (default every one), or those
                    whose event id is in ``event_ids``; failed records are not written
``unknown_tenant``  every lookup answers ``[]`` (no account)
``malformed``       200 whose body is truncated JSON; nothing written
``partial_500``     writes the first ``written`` records (default half), then answers 500
``reject``          ``status`` (default 422) with ``error_code`` (default 42201); with
                    ``event_ids``, only produce requests holding one of those records
==================  =====================================================================

Control over HTTP (for other processes): ``GET /_records``, ``DELETE /_records`` (reset),
``GET /_stats``, ``POST /_faults`` ``{"mode": ..., ...}``, ``DELETE /_faults``,
``POST /_customers`` ``{"tenant_id": ..., "customer_id": ...}``; from Python,
:class:`~meter_core.devserver.remote.RemoteBackend` and ``backend_process()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from meter_core.devserver.server import DevServer
from meter_core.devserver.state import FAULT_MODES, Fault

__all__ = ["FAULT_MODES", "DevServer", "Fault", "serve"]


def serve(
    host: str, port: int, *, on_record: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> None:  # fmt: skip
    """Run a DevServer in the foreground until KeyboardInterrupt."""
    server = DevServer(host, port, on_record=on_record, **options)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
