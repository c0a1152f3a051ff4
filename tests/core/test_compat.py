"""meter-lib 0.1.0 compatibility: same signatures, same contract, same bytes on the wire."""

from __future__ import annotations

import inspect
import json
import logging

import meter_lib
import pytest

import meter_core
from meter_core import CLIENT_OPTIONS, InvalidEvent, compat, post_ai_meter_usage, post_meter_usage
from meter_core.devserver import DevServer

KEY = "sk-compat-KEY-777"
T0 = 1_700_000_000_000


def value_bytes(body: bytes) -> bytes:
    """The raw bytes of the one record value in a produce body."""
    start = body.index(b'"value": ') + len(b'"value": ')
    assert body.endswith(b"}]}")
    return body[start:-3]


def test_signatures_are_meter_libs() -> None:
    for name in ("post_meter_usage", "post_ai_meter_usage"):
        ours = inspect.signature(getattr(meter_core, name))
        theirs = inspect.signature(getattr(meter_lib, name))
        assert list(ours.parameters) == list(theirs.parameters)
        for param in ours.parameters.values():
            assert param.default == theirs.parameters[param.name].default


def test_volume_record_bytes_match_meter_lib_then_add_our_fields() -> None:
    with DevServer(api_key=KEY) as backend:
        args = dict(
            tenant_id="acme", device_id="web-1", meter_id="page.processed.basic",
            kafka_url=backend.url, total_usage=3, portal_url=backend.url, api_key=KEY,
            timestamp=T0, metadata={"rule_id": "r1", "batch": 7},
        )  # fmt: skip
        theirs = meter_lib.post_meter_usage(**args)
        ours = post_meter_usage(**args)  # type: ignore[arg-type]
        assert theirs is not None and ours is not None
        assert set(ours) == set(theirs)
        their_body, our_body = backend.raw_bodies
    their_value, our_value = value_bytes(their_body), value_bytes(our_body)
    # meter-lib's value, byte for byte, then the fields this suite adds
    assert our_value.startswith(their_value[:-1] + b", ")
    parsed = json.loads(our_value)
    assert list(parsed)[5:] == ["event_id", "tenant_id", "device_id"]
    assert parsed["metadata"] == {"rule_id": "r1", "batch": "7"}
    assert json.loads(our_body)["records"][0]["key"] == parsed["customer_id"]


def test_ai_record_bytes_match_meter_lib() -> None:
    with DevServer(api_key=KEY) as backend:
        for start, end in ((T0, None), (None, T0 + 5000)):
            args = dict(
                tenant_id="acme", device_id="web-1", meter_id="chat.on.time_hours",
                kafka_url=backend.url, portal_url=backend.url, api_key=KEY,
                start_time=start, end_time=end, metadata={"session_id": "s1"},
            )  # fmt: skip
            assert meter_lib.post_ai_meter_usage(**args) is not None
            assert post_ai_meter_usage(**args) is not None  # type: ignore[arg-type]
        bodies = backend.raw_bodies
    for theirs, ours in ((bodies[0], bodies[1]), (bodies[2], bodies[3])):
        assert value_bytes(ours).startswith(value_bytes(theirs)[:-1] + b", ")


def test_failures_return_none_and_log_instead_of_printing(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with DevServer(api_key=KEY) as backend:
        common = dict(kafka_url=backend.url, portal_url=backend.url, api_key=KEY)
        backend.set_fault("unknown_tenant")
        assert (
            post_meter_usage("ghost", "d", "page.processed.basic", total_usage=1, **common) is None
        )  # type: ignore[arg-type]
        backend.clear_fault()
        backend.set_fault("down")
        assert (
            post_meter_usage("acme", "d", "page.processed.basic", total_usage=1, **common) is None
        )  # type: ignore[arg-type]
        backend.set_fault("html502")
        assert (
            post_ai_meter_usage("acme", "d", "chat.on.time_hours", start_time=T0, **common) is None
        )  # type: ignore[arg-type]
    assert capsys.readouterr().out == ""
    assert "not posted" in caplog.text
    assert KEY not in caplog.text


def test_network_failure_and_bad_url_return_none(closed_port_url: str) -> None:
    assert (
        post_meter_usage(
            "acme", "d", "page.processed.basic", closed_port_url, 1, closed_port_url, "k"
        )
        is None
    )
    assert post_meter_usage("acme", "d", "page.processed.basic", None, 1) is None  # type: ignore[arg-type]


def test_invalid_arguments_raise_at_once() -> None:
    with pytest.raises(InvalidEvent, match="meter_id"):
        post_meter_usage("acme", "d", "document.basic.page", "http://127.0.0.1:9", 1)
    with pytest.raises(InvalidEvent, match="start_time"):
        post_ai_meter_usage("acme", "d", "chat.on.time_hours", "http://127.0.0.1:9")


def test_calls_share_a_pooled_session_and_the_lookup_cache() -> None:
    with DevServer(api_key=KEY) as backend:
        for _ in range(10):
            assert post_meter_usage(
                "acme", "d", "page.processed.basic", backend.url, 1, backend.url, KEY
            )
        assert backend.lookups == ["acme"]
        assert len(backend.records) == 10


def test_internal_mode_works_unlike_meter_lib(caplog: pytest.LogCaptureFixture) -> None:
    # meter-lib's internal URL starts with a space; ours is the in-cluster service URL.
    with DevServer() as backend:
        client = meter_core.MeterClient(backend.url, internal_url=backend.url, device_id="d")
        assert client.send(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        client.close()
    assert meter_core.CLIENT_OPTIONS["internal_url"].default == (
        "http://metering.metering.svc.cluster.local:8000"
    )


def test_compat_logs_go_to_the_meter_logger(
    caplog: pytest.LogCaptureFixture, closed_port_url: str
) -> None:
    caplog.set_level(logging.ERROR)
    post_meter_usage("acme", "d", "page.processed.basic", closed_port_url, 1)
    assert any(r.name.startswith("meter") for r in caplog.records)


def test_without_a_portal_url_the_lookup_goes_to_meter_internal_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Migrated code that never passed portal_url can be pointed at the local backend.
    with DevServer() as backend:
        monkeypatch.setenv("METER_INTERNAL_URL", backend.url)
        answer = post_meter_usage("acme", "d", "page.processed.basic", backend.url, 3)
        assert answer is not None
        assert backend.lookups == ["acme"] and backend.values()[0]["total_usage"] == 3


@pytest.mark.parametrize("key", [KEY.encode(), KEY + "\n", 42, bytearray(KEY.encode()), [KEY]])
def test_a_key_that_is_not_a_usable_str_is_refused_unshown_not_sent(
    key: object, caplog: pytest.LogCaptureFixture
) -> None:
    with DevServer(api_key=KEY) as backend:
        result = post_meter_usage("acme", "d", "page.processed.basic", backend.url,
                                  total_usage=1, portal_url=backend.url, api_key=key)  # type: ignore[arg-type]  # fmt: skip
        assert result is None
        assert backend.lookups == []  # refused before any request
    assert "api_key" in caplog.text and "not posted" in caplog.text
    assert KEY not in caplog.text


def test_a_secret_given_as_the_key_is_used_as_such() -> None:
    with DevServer(api_key=KEY) as backend:
        secret = meter_core.Secret(KEY)
        result = post_meter_usage("acme", "d", "page.processed.basic", backend.url,
                                  total_usage=1, portal_url=backend.url, api_key=secret)  # type: ignore[arg-type]  # fmt: skip
        assert result is not None
        assert backend.lookups == ["acme"]


@pytest.mark.parametrize(
    ("portal_url", "api_key"), [("", None), ("", ""), ("", KEY), ("portal.example.com", None)]
)
def test_a_portal_url_or_key_alone_is_ignored_as_meter_lib_did(
    portal_url: str, api_key: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (os.environ.get("PORTAL_URL", "") in a service that looks customers up in-cluster)
    with DevServer() as backend:
        monkeypatch.setenv("METER_INTERNAL_URL", backend.url)
        answers = [
            f("acme", "d", "page.processed.basic", backend.url, 1, portal_url, api_key)
            for f in (meter_lib.post_meter_usage, post_meter_usage)
        ]
        assert answers[1] is not None
        assert backend.lookups == ["acme"]  # ours, in-cluster (meter-lib's URL is broken)


def test_a_tenant_given_an_account_is_billed_at_its_next_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # meter-lib asked at every call: a cached "no account" would drop the calls after the
    # account was made, for as long as it is cached
    with DevServer(unknown_tenants=["newco"]) as backend:
        monkeypatch.setenv("METER_INTERNAL_URL", backend.url)
        assert post_meter_usage("newco", "d", "page.processed.basic", backend.url, 1) is None
        backend.add_customer("newco", "cust-new")
        assert post_meter_usage("newco", "d", "page.processed.basic", backend.url, 2) is not None
        assert [(v["customer_id"], v["total_usage"]) for v in backend.values()] == [("cust-new", 2)]
        # customer ids themselves are cached (METER_CUSTOMER_CACHE_TTL)
        assert post_meter_usage("newco", "d", "page.processed.basic", backend.url, 3)
        assert backend.lookups == ["newco", "newco"]


def test_metadata_keys_and_float_times_are_sent_as_meter_lib_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with DevServer() as backend:
        monkeypatch.setenv("METER_INTERNAL_URL", backend.url)
        metadata = {1: 2, False: "x", None: 3, 1.5: "f", "k": None}
        assert post_meter_usage("acme", "d", "page.processed.basic", backend.url, 1,
                                timestamp=T0 + 0.75, metadata=metadata)  # type: ignore[arg-type]  # fmt: skip
        assert post_ai_meter_usage("acme", "d", "chat.on.time_hours", backend.url,
                                   start_time=T0 + 0.25)  # type: ignore[arg-type]  # fmt: skip
        volume, session = backend.values()
    # the keys json.dumps gives them (what meter-lib sent), values through str()
    assert volume["metadata"] == json.loads(json.dumps({k: str(v) for k, v in metadata.items()}))
    assert volume["event_time"] == T0 and session["start_time"] == T0


def test_a_malformed_cache_variable_is_warned_about_not_fatal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with DevServer() as backend:
        monkeypatch.setenv("METER_INTERNAL_URL", backend.url)
        monkeypatch.setenv("METER_NEGATIVE_CACHE_TTL", "30s")
        assert post_meter_usage("acme", "d", "page.processed.basic", backend.url, 1)
        assert "METER_NEGATIVE_CACHE_TTL" in caplog.text


def test_a_blank_internal_url_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # (" " was taken for a URL: every call refused it and dropped its event)
    monkeypatch.setenv("METER_INTERNAL_URL", " ")
    client = compat._client("http://127.0.0.1:9", None, None)
    assert client.options["internal_url"] == CLIENT_OPTIONS["internal_url"].default
