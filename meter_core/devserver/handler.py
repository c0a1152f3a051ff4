"""HTTP handling of the local backend: the lookup API, REST Proxy v2 produce, and the
control API (``/_records``, ``/_stats``, ``/_faults``, ``/_customers``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from meter_core.devserver.state import BackendState, Fault

__all__ = ["make_handler"]

logger = logging.getLogger("meter.devserver")

EXTERNAL_PREFIX = "/metering/v1alpha1/customer-accounts/tenant/"
INTERNAL_PREFIX = "/v1alpha1/customer-accounts/tenant/"
PRODUCE_TYPE = "application/vnd.kafka.json.v2+json"
HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
)


def make_handler(
    state: BackendState,
    *,
    topic: str,
    api_key: str | None,
    lookup_shape: str,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``state`` and the server's options."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and
        # the client's delayed ACK would stall every keep-alive answer for ~40 ms.
        disable_nagle_algorithm = True
        server_version = "meter-devserver"

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s %s", self.address_string(), format % args)

        # -- helpers ---------------------------------------------------------------

        def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any, **headers: str) -> None:
            content_type = "application/vnd.kafka.v2+json" if status < 300 else "application/json"
            self._send(status, json.dumps(data).encode(), content_type, **headers)

        def _error(self, status: int, code: int, message: str, **headers: str) -> None:
            self._json(status, {"error_code": code, "message": message}, **headers)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _remember_headers(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                state.last_headers = headers

        def _apply_fault(self, fault: Fault | None) -> bool:
            """Answer for a fault that replaces the normal answer; True when answered."""
            if fault is None:
                return False
            if fault.mode == "slow":
                time.sleep(float(fault.params.get("delay", 1.0)))
                return False
            if fault.mode == "down":
                status = int(fault.params.get("status", 503))
                self._error(status, status * 100 + 1, "service unavailable (local backend is down)")
                return True
            if fault.mode == "html502":
                self._send(502, HTML_502, "text/html")
                return True
            if fault.mode == "rate_limit":
                retry_after = str(fault.params.get("retry_after", 1))
                self._error(429, 42901, "too many requests", Retry_After=retry_after)
                return True
            if fault.mode == "reject":
                status = int(fault.params.get("status", 422))
                self._error(status, int(fault.params.get("error_code", 42201)), "rejected")
                return True
            return False

        # -- routes ----------------------------------------------------------------

        def do_GET(self) -> None:
            self._remember_headers()
            path = self.path.split("?", 1)[0]
            if path.startswith(EXTERNAL_PREFIX):
                self._lookup(unquote(path[len(EXTERNAL_PREFIX) :]), external=True)
            elif path.startswith(INTERNAL_PREFIX):
                self._lookup(unquote(path[len(INTERNAL_PREFIX) :]), external=False)
            elif path == "/_records":
                with state.lock:
                    records = list(state.records)
                self._json(200, {"records": records})
            elif path == "/_stats":
                self._json(200, state.stats())
            else:
                self._error(404, 40400, f"no route {path}")

        def do_DELETE(self) -> None:
            self._body()
            path = self.path.split("?", 1)[0]
            if path == "/_records":
                state.reset()
            elif path == "/_faults":
                state.clear_fault()
            else:
                self._error(404, 40400, f"no route {path}")
                return
            self._json(200, {"ok": True})

        def do_POST(self) -> None:
            self._remember_headers()
            body = self._body()
            path = self.path.split("?", 1)[0]
            if path.startswith("/topics/"):
                self._produce(unquote(path[len("/topics/") :]), body)
            elif path in ("/_faults", "/_customers"):
                self._control(path, body)
            else:
                self._error(404, 40400, f"no route {path}")

        def _control(self, path: str, body: bytes) -> None:
            try:
                data = json.loads(body)
                if path == "/_faults":
                    params = dict(data)
                    state.set_fault(params.pop("mode"), **params)
                else:
                    with state.lock:
                        state.customers[data["tenant_id"]] = data["customer_id"]
                        state.unknown_tenants.discard(data["tenant_id"])
            except (ValueError, KeyError, TypeError) as exc:
                self._error(400, 40000, f"bad control request: {exc}")
                return
            self._json(200, {"ok": True})

        def _lookup(self, tenant: str, *, external: bool) -> None:
            state.lookup_started()
            try:
                self._answer_lookup(tenant, external=external)
            finally:
                state.lookup_ended()

        def _answer_lookup(self, tenant: str, *, external: bool) -> None:
            if external:
                auth = self.headers.get("Authorization", "")
                token = auth[7:] if auth.startswith("Bearer ") else ""
                if not token or (api_key is not None and token != api_key):
                    self._error(401, 40101, "missing or wrong bearer token")
                    return
                raw_tenant = self.headers.get("x-tenant-id", "")
                header_tenant = raw_tenant.encode("latin-1").decode("utf-8", "replace")
                if header_tenant != tenant:
                    self._error(400, 40001, "x-tenant-id does not match the path")
                    return
            fault = state.take_fault(lookup=True)
            if fault is not None and fault.mode == "unknown_tenant":
                with state.lock:
                    state.lookups.append(tenant)
                self._json(200, [])
                return
            if self._apply_fault(fault):
                return
            customer = state.customer_for(tenant)
            if customer is None:
                self._json(200, [])
                return
            account = {"id": customer, "tenant_id": tenant, "name": f"Account of {tenant}"}
            self._json(200, [account] if lookup_shape == "list" else account)

        def _produce(self, requested_topic: str, body: bytes) -> None:
            with state.lock:
                state.produce_requests += 1
                state.raw_bodies.append(body)
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type != PRODUCE_TYPE:
                self._error(415, 415, f"HTTP 415 Unsupported Media Type: {content_type!r}")
                return
            if requested_topic != topic:
                self._error(404, 40401, f"Topic {requested_topic} not found.")
                return
            try:
                data = json.loads(body)
            except ValueError:
                self._error(422, 42201, "request body is not JSON")
                return
            records = data.get("records") if isinstance(data, dict) else None
            if not isinstance(records, list) or not records:
                self._error(422, 42202, "request body needs a non-empty 'records' list")
                return
            for record in records:
                if not isinstance(record, dict) or not isinstance(record.get("value"), dict):
                    self._error(422, 42203, "each record needs a JSON object 'value'")
                    return
            fault = state.take_fault(lookup=False)
            if fault is not None and fault.mode == "reject" and "event_ids" in fault.params:
                poisoned = set(fault.params["event_ids"])
                if not any(r["value"].get("event_id") in poisoned for r in records):
                    fault = None  # a request without a poisoned record goes through
            if self._apply_fault(fault):
                return
            mode = fault.mode if fault is not None else None
            if mode == "malformed":
                self._send(200, b'{"offsets": [', "application/vnd.kafka.v2+json")
                return
            if mode == "partial_500":
                assert fault is not None
                written = int(fault.params.get("written", len(records) // 2))
                self._write(records[:written])
                self._error(500, 50001, "internal error after a partial write")
                return
            failing = _failing_indexes(fault, records) if mode == "record_errors" else set()
            offsets: list[dict[str, Any]] = []
            written_offsets = iter(
                self._write([r for i, r in enumerate(records) if i not in failing])
            )
            code = int(fault.params.get("error_code", 50003)) if fault else 50003
            for index in range(len(records)):
                if index in failing:
                    offsets.append({"partition": None, "offset": None, "error_code": code,
                                    "error": f"local backend record error {code}"})  # fmt: skip
                else:
                    offsets.append({"partition": 0, "offset": next(written_offsets),
                                    "error_code": None, "error": None})  # fmt: skip
            self._json(200, {"key_schema_id": None, "value_schema_id": None, "offsets": offsets})

        def _write(self, records: list[dict[str, Any]]) -> list[int]:
            offsets = state.write(topic, records)
            if on_record is not None:
                for record in records:
                    try:
                        on_record(record)
                    except Exception:
                        logger.exception("on_record callback failed")
            return offsets

    return Handler


def _failing_indexes(fault: Fault | None, records: list[dict[str, Any]]) -> set[int]:
    """Records a ``record_errors`` fault fails: those whose event id is in ``event_ids``
    when given, else every ``every``-th record counting from 1 (every=1: all; every=2:
    the 2nd, 4th, ...)."""
    assert fault is not None
    event_ids = fault.params.get("event_ids")
    if event_ids is not None:
        wanted = set(event_ids)
        return {i for i, r in enumerate(records) if r["value"].get("event_id") in wanted}
    every = max(1, int(fault.params.get("every", 1)))
    return {i for i in range(len(records)) if (i + 1) % every == 0}
