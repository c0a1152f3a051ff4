"""Client options: checked at construction, read from METER_* variables, secrets hidden."""

from __future__ import annotations

import inspect
import logging
import traceback

import pytest

from meter_core import CLIENT_OPTIONS, ConfigurationError, MeterClient, Secret
from meter_core.config import options_from_env, redact_url

KEY = "sk-live-THE-API-KEY-123"


def test_every_client_option_is_in_the_registry_with_the_same_default() -> None:
    params = inspect.signature(MeterClient).parameters
    assert set(params) == set(CLIENT_OPTIONS)
    for name, param in params.items():
        option = CLIENT_OPTIONS[name]
        assert param.default == option.default, name
        if name not in ("kafka_url", "portal_url", "api_key"):
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, name


@pytest.mark.parametrize("url", ["", "kafka:8082", "ftp://host", "http://", "http://host:notaport"])
def test_malformed_kafka_url_is_a_configuration_error_at_construction(url: str) -> None:
    with pytest.raises(ConfigurationError, match="kafka_url"):
        MeterClient(url)


def test_missing_kafka_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="kafka_url: is required"):
        MeterClient()


def test_portal_and_internal_urls_are_checked_too() -> None:
    with pytest.raises(ConfigurationError, match="portal_url"):
        MeterClient("http://kafka:8082", "portal.example")
    with pytest.raises(ConfigurationError, match="internal_url"):
        MeterClient("http://kafka:8082", internal_url="nope")


@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_size", 0), ("batch_size", 2.5), ("timeout", -1), ("timeout", "10"),
     ("max_queue", True), ("durable", "yes please"), ("flush_interval", float("nan")),
     ("transport", "carrier-pigeon"), ("device_id", "bad\nid")],
)  # fmt: skip
def test_bad_option_values_name_the_option(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=option):
        MeterClient("http://kafka:8082", **{option: value})  # type: ignore[arg-type]


def test_durable_mode_needs_a_store() -> None:
    with pytest.raises(ConfigurationError, match="durable"):
        MeterClient("http://kafka:8082", durable=True)


def test_from_env_reads_meter_variables_and_overrides_win() -> None:
    env = {
        "METER_KAFKA_URL": "http://kafka:8082/",
        "METER_PORTAL_URL": "https://portal.example",
        "METER_API_KEY": KEY,
        "METER_TOPIC": "usage-test",
        "METER_DEVICE_ID": "worker-7",
        "METER_BATCH_SIZE": "50",
        "METER_DURABLE": "false",
        "METER_FLUSH_INTERVAL": "0.25",
    }
    client = MeterClient.from_env(env, batch_size=10)
    options = client.options
    assert options["kafka_url"] == "http://kafka:8082"
    assert options["topic"] == "usage-test"
    assert client.device_id == "worker-7"
    assert options["batch_size"] == 10
    assert options["flush_interval"] == 0.25
    assert options["durable"] is False
    assert isinstance(options["api_key"], Secret)
    assert options["api_key"].reveal() == KEY


def test_from_env_drops_whitespace_at_the_ends_of_text_values_but_ids() -> None:
    # (an env file's "METER_TOPIC=usage-test ": the produce URL would name another topic)
    env = {"METER_KAFKA_URL": "http://kafka:8082", "METER_DEVICE_ID": " web-1 ",
           "METER_TOPIC": "usage-test ", "METER_TRANSPORT": " memory"}  # fmt: skip
    client = MeterClient.from_env(env)
    assert client.options["topic"] == "usage-test"
    assert client.options["transport"] == "memory"
    assert client.device_id == " web-1 "  # billed data: as given


def test_an_empty_or_blank_variable_counts_as_unset() -> None:
    # (a compose file's "METER_DEVICE_ID: ${DEVICE_ID}" with DEVICE_ID unset: refused, it
    # stopped the app at its import; METER_ENABLED= turned metering off)
    env = {"METER_KAFKA_URL": "http://kafka:8082", "METER_DEVICE_ID": "", "METER_ENABLED": "",
           "METER_TIMEOUT": " ", "METER_TOPIC": "", "METER_SPOOL_PATH": "", "METER_DURABLE": "",
           "METER_PORTAL_URL": "", "METER_TRANSPORT": "\t"}  # fmt: skip
    assert options_from_env(env) == {"kafka_url": "http://kafka:8082"}
    client = MeterClient.from_env(env)
    assert client.device_id is None and client.options["enabled"] is True
    assert client.options["topic"] == "usage-events" and client.failure_store is None
    client.close(timeout=0)


def test_from_env_reports_the_variable_name() -> None:
    with pytest.raises(ConfigurationError, match="METER_BATCH_SIZE"):
        MeterClient.from_env({"METER_KAFKA_URL": "http://k", "METER_BATCH_SIZE": "many"})
    with pytest.raises(ConfigurationError, match="kafka_url"):
        MeterClient.from_env({})


def test_api_key_is_in_no_repr_or_option_dump() -> None:
    client = MeterClient("http://kafka:8082", "https://portal.example", KEY)
    for text in (repr(client), str(client.options), repr(client.transport), str(Secret(KEY))):
        assert KEY not in text


def test_api_key_is_in_no_traceback_local_of_a_failed_construction() -> None:
    with pytest.raises(ConfigurationError) as info:
        MeterClient("not a url", "https://portal.example", KEY)
    assert KEY not in str(info.value)
    frames = traceback.walk_tb(info.value.__traceback__)
    for frame, _ in frames:
        for name, value in frame.f_locals.items():
            assert KEY not in repr(value), f"{name} in {frame.f_code.co_name}"


@pytest.mark.parametrize("bad", [KEY + "\n", " " + KEY, KEY[:5] + "\x00" + KEY[5:]])
def test_an_api_key_that_cannot_go_in_a_header_is_refused_without_showing_it(bad: str) -> None:
    # A key read from a file often ends with a newline; sent as is, the HTTP library would
    # refuse the header with an error quoting the key, which then reaches logs and stores.
    for build in (
        lambda: MeterClient("http://kafka:8082", "https://portal.example", bad),
        lambda: MeterClient.from_env({"METER_KAFKA_URL": "http://k:1", "METER_API_KEY": bad}),
    ):
        with pytest.raises(ConfigurationError, match="api_key|METER_API_KEY") as info:
            build()
        assert KEY not in str(info.value) and "secret file" in str(info.value)


def test_api_key_is_in_no_traceback_local_of_a_failed_from_env() -> None:
    with pytest.raises(ConfigurationError) as info:
        MeterClient.from_env({}, kafka_url="http://k:1", api_key=KEY, timeout="slow")
    for frame, _ in traceback.walk_tb(info.value.__traceback__):
        for name, value in frame.f_locals.items():
            assert KEY not in repr(value), f"{name} in {frame.f_code.co_name}"


def test_secret_refuses_to_be_pickled() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(Secret(KEY))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pw@kafka:8082/x", "http://***@kafka:8082/x"),
        ("https://h/p?api_key=abc&x=1", "https://h/p?api_key=***&x=***"),
        ("http://kafka:8082", "http://kafka:8082"),
        # user info that urlsplit would not take for one: a / or a # in the password
        ("https://user:sk/SECRET@host/p", "https://***@host/p"),
        ("https://user:sk#SECRET@host/p", "https://***@host/p"),
        ("https://h/p#SECRET", "https://h/p#***"),
        ("https://h/p?a=SECRET;b=SECRET", "https://h/p?a=***"),
        ("sk-SECRET", "<not a URL>"),
        (b"https://user:SECRET@h", "<bytes>"),
    ],
)
def test_redact_url_hides_credentials(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "SECRET" not in redact_url(url)


def test_configuration_errors_redact_urls(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError) as info:
        MeterClient("ftp://admin:hunter2@kafka")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("name", ["flush_interval", "batch_size", "timeout", "enabled", "topic"])
def test_none_for_an_option_with_a_default_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{name}: must not be None"):
        MeterClient(transport="memory", **{name: None})


@pytest.mark.parametrize(
    ("name", "value"),
    [("flush_interval", 1e10), ("timeout", 10**30), ("negative_cache_ttl", 10**400),
     ("backoff_cap", 1e12)],
)  # fmt: skip
def test_durations_too_long_for_the_clock_are_refused_at_construction(
    name: str, value: float
) -> None:
    with pytest.raises(ConfigurationError, match=f"{name}: must be <="):
        MeterClient(transport="memory", **{name: value})


def test_a_huge_number_from_the_environment_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="METER_TIMEOUT"):
        MeterClient.from_env({"METER_TIMEOUT": "1" + "0" * 400, "METER_TRANSPORT": "memory"})


@pytest.mark.parametrize(
    "key", [KEY + "\u2013", KEY + "\u00a0x", Secret(KEY + "\n"), Secret(KEY + "\u2013")]
)
def test_a_key_that_cannot_go_into_a_header_is_refused_without_being_shown(
    key: object, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigurationError, match="api_key") as info:
        MeterClient("http://kafka", "http://portal", key)  # type: ignore[arg-type]
    assert KEY not in str(info.value)
    assert KEY not in "".join(traceback.format_exception(info.value))


def test_a_secret_holds_a_str() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        Secret(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["kafka_url", "portal_url", "internal_url"])
def test_a_key_given_where_a_url_goes_is_not_shown(where: str) -> None:
    urls = {"kafka_url": "http://kafka", "portal_url": "http://portal"}
    with pytest.raises(ConfigurationError, match=where) as info:
        MeterClient(**{**urls, where: KEY}, api_key=KEY)  # type: ignore[arg-type]
    assert KEY not in str(info.value)
    assert "not shown" in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://kafka/x?api_key=" + KEY, "http://kafka/x#" + KEY, "http://kafka?"]
)
def test_a_url_with_a_query_or_fragment_is_refused(url: str) -> None:
    # (the client appends paths to it: /topics/usage-events would land in the query)
    with pytest.raises(ConfigurationError, match="kafka_url: URL must not have a query") as info:
        MeterClient(url)
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("portal_url", "api_key", "warned"),
    [("http://portal", None, "portal_url is set but api_key is not"),
     (None, KEY, "api_key is set but portal_url is not"),
     ("http://portal", KEY, None), (None, None, None)],
)  # fmt: skip
def test_half_of_the_external_lookup_settings_is_a_warning_naming_where_lookups_go(
    portal_url: str | None, api_key: str | None, warned: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="meter"):
        client = MeterClient("http://kafka", portal_url, api_key)
    lines = [r.getMessage() for r in caplog.records if "customer lookups go to" in r.getMessage()]
    assert lines == ([] if warned is None else [lines[0]])
    if warned is not None:
        assert warned in lines[0] and "in-cluster" in lines[0]
    external = client.transport.external_lookup  # type: ignore[attr-defined]
    assert external is (portal_url is not None and api_key is not None)
    assert KEY not in caplog.text
    client.close()
