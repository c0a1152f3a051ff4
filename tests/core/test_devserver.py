"""The local backend speaks both protocols and misbehaves on request (standard library
HTTP only here, so these tests do not depend on the client they help test)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from meter_core.devserver import DevServer

PRODUCE = {"Content-Type": "application/vnd.kafka.json.v2+json"}


def call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def produce(server: DevServer, records: list[dict[str, Any]], topic: str = "usage-events") -> Any:
    return call(f"{server.url}/topics/{topic}", "POST", {"records": records}, PRODUCE)


def rec(i: int) -> dict[str, Any]:
    return {"key": "c", "value": {"event_id": f"e{i}", "n": i}}


def test_internal_lookup(backend: DevServer) -> None:
    status, _, body = call(f"{backend.url}/v1alpha1/customer-accounts/tenant/acme")
    assert status == 200
    assert json.loads(body)["id"] == "cust-acme"
    assert backend.lookups == ["acme"]


def test_external_lookup_needs_the_bearer_key_and_tenant_header() -> None:
    with DevServer(api_key="k1") as server:
        url = f"{server.url}/metering/v1alpha1/customer-accounts/tenant/acme"
        assert call(url)[0] == 401
        assert call(url, headers={"Authorization": "Bearer nope", "x-tenant-id": "acme"})[0] == 401
        assert call(url, headers={"Authorization": "Bearer k1", "x-tenant-id": "other"})[0] == 400
        status, _, body = call(url, headers={"Authorization": "Bearer k1", "x-tenant-id": "acme"})
        assert status == 200
        assert json.loads(body)["id"] == "cust-acme"


def test_lookup_percent_decodes_and_supports_lists_and_unknown_tenants() -> None:
    with DevServer(lookup_shape="list", unknown_tenants={"ghost"}, customers={"a b/c": "X"}) as s:
        _, _, body = call(f"{s.url}/v1alpha1/customer-accounts/tenant/a%20b%2Fc")
        assert json.loads(body) == [{"id": "X", "tenant_id": "a b/c", "name": "Account of a b/c"}]
        assert json.loads(call(f"{s.url}/v1alpha1/customer-accounts/tenant/ghost")[2]) == []
        s.add_customer("ghost", "G")
        assert (
            json.loads(call(f"{s.url}/v1alpha1/customer-accounts/tenant/ghost")[2])[0]["id"] == "G"
        )


def test_produce_answers_offsets_in_order(backend: DevServer) -> None:
    status, headers, body = produce(backend, [rec(1), rec(2)])
    assert status == 200
    assert headers["Content-Type"] == "application/vnd.kafka.v2+json"
    offsets = json.loads(body)["offsets"]
    assert [o["offset"] for o in offsets] == [0, 1]
    assert backend.event_ids() == ["e1", "e2"]
    produce(backend, [rec(3)])
    assert backend.records[-1]["offset"] == 2


@pytest.mark.parametrize(
    ("headers", "body", "topic", "status"),
    [
        ({"Content-Type": "application/json"}, {"records": [rec(1)]}, "usage-events", 415),
        (PRODUCE, {"records": [rec(1)]}, "other-topic", 404),
        (PRODUCE, b"not json", "usage-events", 422),
        (PRODUCE, {"records": [{"key": "no value"}]}, "usage-events", 422),
        (PRODUCE, {"records": []}, "usage-events", 422),
    ],
)
def test_produce_errors(
    backend: DevServer, headers: dict[str, str], body: Any, topic: str, status: int
) -> None:
    got, _, raw = call(f"{backend.url}/topics/{topic}", "POST", body, headers)
    assert got == status
    assert "error_code" in json.loads(raw)
    assert backend.records == []


def test_down_and_html502_hit_produce_and_lookups(backend: DevServer) -> None:
    backend.set_fault("down")
    assert produce(backend, [rec(1)])[0] == 503
    assert call(f"{backend.url}/v1alpha1/customer-accounts/tenant/a")[0] == 503
    backend.set_fault("html502")
    status, headers, body = produce(backend, [rec(1)])
    assert status == 502
    assert headers["Content-Type"] == "text/html"
    assert body.startswith(b"<html>")


def test_faults_clear_themselves_after_times(backend: DevServer) -> None:
    backend.set_fault("rate_limit", retry_after=4, times=2)
    first = produce(backend, [rec(1)])
    assert first[0] == 429
    assert first[1]["Retry-After"] == "4"
    assert produce(backend, [rec(2)])[0] == 429
    assert produce(backend, [rec(3)])[0] == 200
    assert backend.event_ids() == ["e3"]


def test_record_errors_fail_every_nth_record(backend: DevServer) -> None:
    backend.set_fault("record_errors", every=2, error_code=50003)
    offsets = json.loads(produce(backend, [rec(i) for i in range(4)])[2])["offsets"]
    assert [o["error_code"] for o in offsets] == [None, 50003, None, 50003]
    assert backend.event_ids() == ["e0", "e2"]
    backend.set_fault("record_errors", event_ids=["e7"])
    offsets = json.loads(produce(backend, [rec(6), rec(7)])[2])["offsets"]
    assert [o["error_code"] for o in offsets] == [None, 50003]


def test_malformed_partial_500_and_reject(backend: DevServer) -> None:
    backend.set_fault("malformed", times=1)
    status, _, body = produce(backend, [rec(1)])
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    backend.set_fault("partial_500", written=1, times=1)
    assert produce(backend, [rec(2), rec(3)])[0] == 500
    assert backend.event_ids() == ["e2"]
    backend.set_fault("reject", status=413, error_code=41301, times=1)
    assert produce(backend, [rec(4)])[0] == 413


def test_unknown_tenant_fault(backend: DevServer) -> None:
    backend.set_fault("unknown_tenant")
    assert json.loads(call(f"{backend.url}/v1alpha1/customer-accounts/tenant/acme")[2]) == []


def test_unknown_fault_mode_is_refused(backend: DevServer) -> None:
    with pytest.raises(ValueError, match="unknown fault mode"):
        backend.set_fault("explode")


def test_control_api(backend: DevServer) -> None:
    assert call(f"{backend.url}/_faults", "POST", {"mode": "down", "times": 1})[0] == 200
    assert json.loads(call(f"{backend.url}/_stats")[2])["fault"]["mode"] == "down"
    assert produce(backend, [rec(1)])[0] == 503
    produce(backend, [rec(1)])
    produce(backend, [rec(1)])
    stats = json.loads(call(f"{backend.url}/_stats")[2])
    assert stats["records"] == 2
    assert stats["duplicates"] == 1
    assert stats["produce_requests"] == 3
    assert len(json.loads(call(f"{backend.url}/_records")[2])["records"]) == 2
    call(f"{backend.url}/_customers", "POST", {"tenant_id": "t", "customer_id": "C9"})
    assert json.loads(call(f"{backend.url}/v1alpha1/customer-accounts/tenant/t")[2])["id"] == "C9"
    assert call(f"{backend.url}/_records", "DELETE")[0] == 200
    assert backend.records == []
    assert call(f"{backend.url}/nowhere")[0] == 404


def test_restart_on_the_same_port_keeps_state() -> None:
    server = DevServer().start()
    try:
        produce(server, [rec(1)])
        port = server.port
        server.stop()
        with pytest.raises(urllib.error.URLError):
            call(f"{server.url}/_stats")
        server.start()
        assert server.port == port
        produce(server, [rec(2)])
        assert server.event_ids() == ["e1", "e2"]
    finally:
        server.stop()
        server.stop()


def test_on_record_sees_each_written_record() -> None:
    seen: list[dict[str, Any]] = []
    with DevServer(on_record=seen.append) as server:
        produce(server, [rec(1), rec(2)])
    assert [r["value"]["n"] for r in seen] == [1, 2]
