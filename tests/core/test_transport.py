"""Synchronous sends against the real local backend: lookups, answers, redaction."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from typing import Any

import pytest

from meter_core import (
    BackendUnavailable,
    CustomerNotFound,
    DeliveryRejected,
    InvalidEvent,
    MeterClient,
    RateLimited,
)
from meter_core.devserver import DevServer

KEY = "sk-test-SECRET-KEY-0042"
SEND = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 2}


def test_internal_lookup_mode(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    answer = client.send(**SEND)
    assert answer["offsets"][0]["error_code"] is None
    assert backend.lookups == ["acme"]
    (record,) = backend.records
    assert record["key"] == "cust-acme"
    assert record["value"]["customer_id"] == "cust-acme"
    assert "authorization" not in backend.last_headers  # internal mode sends no key


def test_external_lookup_mode_sends_the_bearer_key_and_tenant_header() -> None:
    with DevServer(api_key=KEY) as backend:
        client = MeterClient(backend.url, backend.url, KEY, device_id="d", timeout=2)
        client.send(**SEND)
        assert backend.lookups == ["acme"]
        wrong = MeterClient(backend.url, backend.url, "wrong-key", device_id="d", timeout=2)
        with pytest.raises(DeliveryRejected, match="HTTP 401"):
            wrong.send(**SEND)
        client.close()
        wrong.close()


def test_tenant_is_percent_encoded_in_the_lookup_path(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    tenant = "team a/b?c#d%é"
    client.send(**{**SEND, "tenant_id": tenant})
    assert backend.lookups == [tenant]
    assert backend.values()[0]["customer_id"] == f"cust-{tenant}"


def test_list_shaped_lookup_answers_take_the_first_account() -> None:
    with DevServer(lookup_shape="list", customers={"acme": "C-1"}) as backend:
        client = MeterClient(backend.url, internal_url=backend.url, device_id="d")
        client.send(**SEND)
        assert backend.values()[0]["customer_id"] == "C-1"
        client.close()


def test_one_lookup_for_many_events_of_one_tenant(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    for _ in range(20):
        client.send(**SEND)
    assert backend.lookups == ["acme"]
    assert len(backend.records) == 20


def test_tenant_without_account_is_customer_not_found_and_cached(
    backend: DevServer, make_client: Any
) -> None:
    backend.set_fault("unknown_tenant")
    client = make_client()
    for _ in range(3):
        with pytest.raises(CustomerNotFound):
            client.send(**SEND)
    assert backend.lookups == ["acme"]
    assert backend.records == []


def test_backend_down_is_unavailable(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("down")
    with pytest.raises(BackendUnavailable, match="HTTP 503") as info:
        client.send(**SEND)
    assert info.value.retriable


def test_html_502_is_a_clear_error_not_a_decode_error(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("html502")
    with pytest.raises(BackendUnavailable, match="HTTP 502.*non-JSON body"):
        client.send(**SEND)


def test_rate_limit_carries_retry_after(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("rate_limit", retry_after=7)
    with pytest.raises(RateLimited) as info:
        client.send(**SEND)
    assert info.value.retry_after == 7.0


def test_4xx_is_rejected(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    backend.set_fault("reject", status=422, error_code=42201)
    with pytest.raises(DeliveryRejected) as info:
        client.send(**SEND)
    assert info.value.status == 422
    assert info.value.error_code == 42201
    assert not info.value.retriable


def test_unknown_topic_is_rejected(backend: DevServer, make_client: Any) -> None:
    client = make_client(topic="no-such-topic")
    with pytest.raises(DeliveryRejected) as info:
        client.send(**SEND)
    assert info.value.status == 404


def test_per_record_error_of_a_200_fails_that_record(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    backend.set_fault("record_errors", error_code=50003)
    with pytest.raises(BackendUnavailable, match="record error 50003"):
        client.send(**SEND)
    backend.set_fault("record_errors", error_code=50002)
    with pytest.raises(DeliveryRejected, match="record error 50002"):
        client.send(**SEND)
    assert backend.records == []


def test_malformed_json_reply_is_unavailable(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.lookup_customer("acme")
    backend.set_fault("malformed")
    with pytest.raises(BackendUnavailable, match="malformed"):
        client.send(**SEND)


def test_slow_backend_times_out(backend: DevServer, make_client: Any) -> None:
    client = make_client(timeout=0.2)
    client.lookup_customer("acme")
    backend.set_fault("slow", delay=1.0, times=1)
    with pytest.raises(BackendUnavailable, match="timed out"):
        client.send(**SEND)


def test_connection_refused_is_unavailable(closed_port_url: str) -> None:
    client = MeterClient(closed_port_url, internal_url=closed_port_url, device_id="d", timeout=1)
    with pytest.raises(BackendUnavailable, match="connection refused"):
        client.send(**SEND)
    client.close()


def test_session_events_are_sent_as_ai_events(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    client.send_session(
        tenant_id="acme", meter_id="chat.on.time_hours", start_time=1_700_000_000_000
    )
    value = backend.values()[0]
    assert value["ai_event"] is True
    assert value["start_time"] == 1_700_000_000_000
    assert "total_usage" not in value


def test_produce_uses_the_rest_proxy_content_type(backend: DevServer, make_client: Any) -> None:
    make_client().send(**SEND)
    assert backend.last_headers["content-type"] == "application/vnd.kafka.json.v2+json"


def test_one_pooled_connection_is_reused(backend: DevServer, make_client: Any) -> None:
    client = make_client()
    session = client.transport.session
    for _ in range(5):
        client.send(**SEND)
    assert client.transport.session is session
    pools = session.get_adapter(backend.url).poolmanager.pools
    assert len(pools) == 1


def test_the_api_key_never_reaches_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with DevServer(api_key="other") as backend:
        client = MeterClient(backend.url, backend.url, KEY, device_id="d", timeout=1)
        with pytest.raises(DeliveryRejected) as info:
            client.send(**SEND)
        client.record(**SEND)
        client.flush(2)
        client.close(1)
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value.__context__)
    assert KEY not in caplog.text
    assert KEY not in repr(client)


def test_credentials_in_urls_are_redacted_in_logs(
    closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = closed_port_url.replace("http://", "http://admin:hunter2@")
    client = MeterClient(url, internal_url=url, device_id="d", timeout=1, max_retries=0)
    client.record(**SEND)
    client.flush(5)
    client.close(1)
    assert "hunter2" not in caplog.text
    assert "not delivered" in caplog.text


class _EchoingPortal(http.server.BaseHTTPRequestHandler):
    """A portal that quotes the Authorization header it got in its 401 answer."""

    def do_GET(self) -> None:
        body = json.dumps({"message": f"invalid token {self.headers['Authorization']}"})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


def test_a_portal_quoting_the_key_in_its_answer_does_not_put_it_in_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    portal = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoingPortal)
    threading.Thread(target=portal.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{portal.server_address[1]}"
    try:
        client = MeterClient(url, url, KEY, device_id="d", timeout=2, max_retries=0)
        with pytest.raises(DeliveryRejected) as info:
            client.send(**SEND)
        client.record(**SEND)
        client.flush(3)
        stats = client.stats()
        client.close(1)
    finally:
        portal.shutdown()
        portal.server_close()
    assert "invalid token Bearer ***" in str(info.value)  # the answer, without the key
    assert KEY not in str(info.value)
    assert KEY not in caplog.text
    assert "invalid token" in caplog.text
    assert KEY not in str(stats)


def test_a_tenant_id_cannot_be_a_path_step_of_the_lookup_url(backend: DevServer) -> None:
    client = MeterClient(backend.url, internal_url=backend.url, device_id="d")
    for tenant in (".", ".."):
        with pytest.raises(InvalidEvent, match="tenant_id"):
            client.record(**{**SEND, "tenant_id": tenant})
    client.send(**{**SEND, "tenant_id": "..a"})  # dots within an id are ids like others
    assert backend.lookups == ["..a"]
    client.close()
