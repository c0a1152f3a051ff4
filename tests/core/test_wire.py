"""Reading proxy answers: per-record results, every error class, never a JSONDecodeError."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from meter_core import (
    BackendUnavailable,
    CustomerNotFound,
    DeliveryRejected,
    MeterClient,
    ProduceResult,
    RateLimited,
    RecordResult,
    UsageEvent,
)
from meter_core.devserver import DevServer
from meter_core.wire import (
    RecordEncoder,
    encode_records,
    join_encoded_records,
    parse_customer_account,
    parse_produce_response,
)

JSON = {"Content-Type": "application/vnd.kafka.v2+json"}


def body(data: object) -> bytes:
    return json.dumps(data).encode()


def test_200_with_offsets_gives_one_result_per_record() -> None:
    offsets = [
        {"partition": 0, "offset": 42, "error_code": None, "error": None},
        {"partition": None, "offset": None, "error_code": 50003, "error": "leader moving"},
        {"partition": None, "offset": None, "error_code": 50002, "error": "too large"},
    ]
    result = parse_produce_response(200, JSON, body({"offsets": offsets}), 3)
    ok, retriable, final = result.records
    assert ok.ok and ok.offset == 42
    assert not retriable.ok and retriable.retriable
    assert isinstance(retriable.as_error(), BackendUnavailable)
    assert not final.retriable
    assert isinstance(final.as_error(), DeliveryRejected)
    assert not result.all_ok


def test_offset_count_mismatch_is_retriable() -> None:
    with pytest.raises(BackendUnavailable, match="1 offsets for 2 records"):
        parse_produce_response(200, JSON, body({"offsets": [{}]}), 2)


def test_html_error_page_gives_a_clear_retriable_error() -> None:
    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    with pytest.raises(BackendUnavailable, match="HTTP 502.*non-JSON body.*text/html") as info:
        parse_produce_response(502, {"Content-Type": "text/html"}, page, 1)
    assert info.value.status == 502


def test_malformed_json_on_200_is_retriable_not_a_decode_error() -> None:
    with pytest.raises(BackendUnavailable, match="malformed"):
        parse_produce_response(200, JSON, b'{"offsets": [', 1)


def test_429_is_rate_limited_with_retry_after() -> None:
    with pytest.raises(RateLimited) as info:
        parse_produce_response(
            429, {**JSON, "Retry-After": "3"}, body({"error_code": 42901, "message": "slow"}), 1
        )
    assert info.value.retry_after == 3.0
    assert info.value.retriable
    assert info.value.error_code == 42901


@pytest.mark.parametrize("status", [400, 401, 403, 404, 415, 422])
def test_4xx_is_rejected_and_not_retriable(status: int) -> None:
    with pytest.raises(DeliveryRejected) as info:
        parse_produce_response(
            status, JSON, body({"error_code": status * 100 + 1, "message": "x"}), 1
        )
    assert not info.value.retriable
    assert info.value.status == status


@pytest.mark.parametrize("status", [408, 500, 503, 504])
def test_5xx_and_408_are_unavailable_and_retriable(status: int) -> None:
    with pytest.raises(BackendUnavailable) as info:
        parse_produce_response(status, JSON, body({"error_code": 50001, "message": "x"}), 1)
    assert info.value.retriable


def test_customer_account_object_or_first_of_list() -> None:
    assert parse_customer_account(200, JSON, body({"id": "c1"}), "t") == "c1"
    assert parse_customer_account(200, JSON, body([{"id": "c2"}, {"id": "c3"}]), "t") == "c2"
    assert parse_customer_account(200, JSON, body({"id": 17}), "t") == 17


@pytest.mark.parametrize(("status", "payload"), [(200, []), (404, {"message": "none"})])
def test_no_account_is_customer_not_found(status: int, payload: object) -> None:
    with pytest.raises(CustomerNotFound):
        parse_customer_account(status, JSON, body(payload), "t")


@pytest.mark.parametrize(
    "payload", [{"name": "no id"}, [{"name": "no id"}], {"id": None}, {"id": " "}, {"id": True}]
)
def test_an_account_without_a_usable_id_is_a_malformed_reply_retried(payload: object) -> None:
    # A portal glitch (a partial object) refused every event of the tenant for good as
    # "no customer account", which the API never said (only [] or a 404 say it).
    with pytest.raises(
        BackendUnavailable, match="malformed reply: an account without a usable 'id'"
    ) as caught:
        parse_customer_account(200, JSON, body(payload), "t")
    assert caught.value.retriable


def test_lookup_failure_with_html_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="HTTP 503"):
        parse_customer_account(503, {"Content-Type": "text/html"}, b"<html>down</html>", "t")


def test_body_encoding_matches_json_dumps_defaults() -> None:
    records = [{"value": {"a": 1, "b": "é"}}]
    assert encode_records(records) == json.dumps({"records": records}).encode()
    assert encode_records(records) == b'{"records": [{"value": {"a": 1, "b": "\\u00e9"}}]}'


ENCODER_CASES = [
    (UsageEvent("acme", "web-1", "page.processed.basic", 3), "cust-1"),
    (UsageEvent("acme", "web-1", "page.processed.basic", 0, 1_700_000_000_000), 42),
    (UsageEvent('ténant "q" \\', "dév", "page.processed.basic", 10**15), "çust"),
    (UsageEvent("acme", "web-1", "page.processed.basic", 1, metadata={"é": "\u2603"}), "c"),
    (UsageEvent("acme", "web-1", "chat.on.time_hours", start_time=1_700_000_000_000), "c"),
    (UsageEvent("acme", "web-1", "chat.on.time_hours", end_time=1_700_000_000_000), "c"),
]


@pytest.mark.parametrize(("event", "customer"), ENCODER_CASES)
def test_record_encoder_gives_the_bytes_of_json_dumps(event: UsageEvent, customer: object) -> None:
    encoder = RecordEncoder()
    record = {"key": customer, "value": event.record_value(customer)}  # type: ignore[arg-type]
    for _ in range(2):  # the second time from the cached fragments
        text = encoder.encode(event, customer)
        assert text == json.dumps(record)
        assert text.isascii()
    body = join_encoded_records([encoder.encode(event, customer)] * 2)
    assert body == encode_records([record, record])


def test_the_sender_posts_exactly_what_json_dumps_would(backend: DevServer) -> None:
    client = MeterClient(backend.url, internal_url=backend.url, device_id="dév-1")
    try:
        for i in range(20):
            client.record(
                tenant_id="acmé" if i % 2 else "acme", meter_id="page.processed.basic",
                total_usage=i, metadata={"i": str(i)} if i % 3 else None,
            )  # fmt: skip
        assert client.flush(10)
    finally:
        client.close()
    bodies = backend.raw_bodies
    assert bodies
    for raw in bodies:
        assert raw == json.dumps(json.loads(raw)).encode()
    assert sorted(v["total_usage"] for v in backend.values()) == list(range(20))


def ok_offsets(count: int) -> list[dict[str, object]]:
    return [
        {"partition": 0, "offset": 1000 + i, "error_code": None, "error": None}
        for i in range(count)
    ]


def test_an_answer_where_all_succeeded_reads_as_one_ok_result_per_record() -> None:
    result = parse_produce_response(200, JSON, body({"offsets": ok_offsets(500)}), 500)
    assert result.all_ok
    assert result.count == 500
    assert result.records == tuple(RecordResult(None, None, 0, 1000 + i) for i in range(500))
    assert result.records is result.records  # built once
    assert result.body["offsets"][499]["offset"] == 1499
    assert result == ProduceResult(body=result.body, records=result.records)


def test_one_failed_record_among_500_fails_alone() -> None:
    offsets = ok_offsets(500)
    offsets[250] = {"partition": None, "offset": None, "error_code": 50003, "error": "moving"}
    result = parse_produce_response(200, JSON, body({"offsets": offsets}), 500)
    assert not result.all_ok
    assert result.count == 500
    failed = [i for i, r in enumerate(result.records) if not r.ok]
    assert failed == [250]
    assert result.records[250].retriable
    assert [r.offset for r in result.records if r.ok] == [1000 + i for i in range(500) if i != 250]


@pytest.mark.parametrize("entry", [None, "ok", 42, [], [None]])
def test_an_offsets_entry_that_is_not_an_object_fails_its_record_only(entry: object) -> None:
    for index in (0, 499):
        offsets: list[object] = list(ok_offsets(500))
        offsets[index] = entry
        result = parse_produce_response(200, JSON, body({"offsets": offsets}), 500)
        assert not result.all_ok
        assert [i for i, r in enumerate(result.records) if not r.ok] == [index]
        assert result.records[index].error_code == 50001
        assert isinstance(result.records[index].as_error(), BackendUnavailable)


@pytest.mark.parametrize(
    ("code", "read_as"),
    [("50003", 50001), (True, 50001), (False, 50001), (1.5, 50001), ([], 50001), ({}, 50001),
     (0, 0), (50002, 50002)],
)  # fmt: skip
def test_an_error_code_that_is_not_null_fails_its_record(code: object, read_as: int) -> None:
    offsets = ok_offsets(500)
    offsets[7] = {"partition": 0, "offset": 1007, "error_code": code, "error": "x"}
    result = parse_produce_response(200, JSON, body({"offsets": offsets}), 500)
    assert not result.all_ok
    assert [i for i, r in enumerate(result.records) if not r.ok] == [7]
    assert result.records[7].error_code == read_as


def test_an_empty_answer_for_no_records_is_all_ok() -> None:
    result = parse_produce_response(200, JSON, body({"offsets": []}), 0)
    assert result.all_ok and result.count == 0 and result.records == ()


def test_a_produce_result_built_by_a_transport_reads_its_records() -> None:
    records = [RecordResult(partition=0, offset=1), RecordResult(50003, "moving")]
    result = ProduceResult(body={"offsets": []}, records=records)
    assert result.records == tuple(records)
    assert result.count == 2
    assert not result.all_ok
    assert ProduceResult(body={}, records=records[:1]).all_ok
    assert "50003" in repr(result)
    with pytest.raises(AttributeError):
        result.body = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(result)
    assert pickle.loads(pickle.dumps(result)) == copy.copy(result) == result
