"""Route rules: compiled once, matched by template, view name or concrete path."""

from __future__ import annotations

import pytest

from meter_core import ConfigurationError, InvalidEvent, MeterSpec, RouteRules, parse_usage_header
from meter_core.events import MAX_USAGE
from meter_core.rules import normalize_template


@pytest.mark.parametrize(
    ("template", "normalized"),
    [
        ("/documents/{doc_id}/scan", "/documents/{}/scan"),
        ("/documents/{doc_id:int}/scan", "/documents/{}/scan"),
        ("documents/<int:doc_id>/scan", "/documents/{}/scan"),
        ("/files/{path:path}", "/files/{}"),
        ("/plain", "/plain"),
    ],
)
def test_templates_of_both_frameworks_normalize_alike(template: str, normalized: str) -> None:
    assert normalize_template(template) == normalized


def test_match_route_by_template_and_method() -> None:
    rules = RouteRules(
        {
            "POST /documents/{doc_id}/scan": "page.processed.basic",
            "/reports/{kind}": {"meter": "report.generated.small", "usage": 2},
        }
    )
    assert rules.match_route("POST", "documents/<int:doc_id>/scan") == (
        MeterSpec("page.processed.basic"),
    )
    assert rules.match_route("GET", "/documents/{doc_id}/scan") == ()
    (spec,) = rules.match_route("DELETE", "/reports/{kind}")
    assert spec.usage == 2
    assert rules.match_route("GET", "/unknown") == ()
    assert rules.match_route("GET", None) == ()


def test_the_root_route_django_names_empty_is_the_template_slash() -> None:
    rules = RouteRules({"GET /": "page.processed.basic"})
    assert [s.meter_id for s in rules.match_route("GET", "")] == ["page.processed.basic"]
    assert rules.match_route("GET", None) == ()  # no route resolved


def test_a_rule_without_methods_does_not_bill_head_or_options_requests() -> None:
    rules = RouteRules(
        {"/search": "report.generated.dataquery", "HEAD,OPTIONS /probe": "rule.executed.small"}
    )
    for method in ("GET", "POST", "PUT", "DELETE"):
        assert [s.meter_id for s in rules.match_route(method, "/search")] == [
            "report.generated.dataquery"
        ]
        assert [s.meter_id for s in rules.match_path(method, "/search")] == [
            "report.generated.dataquery"
        ]
    # an uptime check or a CORS preflight does not get the route's result...
    for method in ("HEAD", "OPTIONS"):
        assert rules.match_route(method, "/search") == ()
        assert rules.match_path(method, "/search") == ()
        # ...unless a rule names the method itself
        assert [s.meter_id for s in rules.match_route(method, "/probe")] == ["rule.executed.small"]


def test_several_methods_and_several_meters() -> None:
    rules = RouteRules(
        {"GET,POST /scan": ["page.processed.basic", MeterSpec("page.processed.advanced", usage=3)]}
    )
    assert [s.meter_id for s in rules.match_route("POST", "/scan")] == [
        "page.processed.basic",
        "page.processed.advanced",
    ]
    assert rules.match_route("PUT", "/scan") == ()


def test_match_path_for_apps_without_a_router() -> None:
    rules = RouteRules(
        {
            "POST /documents/{doc_id}/scan": "page.processed.basic",
            "GET /files/{rest:path}": "document.storage.size_gb",
        }
    )
    assert rules.match_path("POST", "/documents/42/scan")
    assert not rules.match_path("POST", "/documents/42/43/scan")
    assert rules.match_path("GET", "/files/a/b/c.pdf")
    assert not rules.match_path("POST", "/documents/42")


def test_view_names_are_matched_as_given() -> None:
    rules = RouteRules({"POST documents:scan": "page.processed.basic"})
    assert rules.match("POST", "documents:scan")
    assert not rules.match("POST", "documents:other")


def test_header_and_session_specs_are_flagged() -> None:
    rules = RouteRules(
        {
            "/scan": {"meter": "page.processed.basic", "header": "X-Meter-Pages"},
            "WEBSOCKET /chat": {"meter": "chat.on.time_hours", "session": True},
        }
    )
    assert rules.has_header_usage and rules.has_sessions
    assert rules.header_names == {"x-meter-pages"}


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"/x": "document.basic.page"}, "unknown meter"),
        ({"/x": {"usage": 1}}, "needs a 'meter'"),
        ({"/x": {"meter": "page.processed.basic", "pages": 1}}, "unknown spec keys"),
        ({"/x": {"meter": "page.processed.basic", "usage": -1}}, "usage must be"),
        ({"/x": {"meter": "page.processed.basic", "usage": "1"}}, "usage must be"),
        ({"/x": {"meter": "page.processed.basic", "usage": 2**63}}, "usage must be an int from 0"),
        ({"/x": []}, "no meter"),
        ({"": "page.processed.basic"}, "rule key"),
        ({"/x": 5}, "expected"),
        # a header no response can carry would bill nothing, silently
        ({"/x": {"meter": "page.processed.basic", "header": "X Meter Usage"}}, "no spaces"),
        ({"/x": {"meter": "page.processed.basic", "header": "X-Usage:"}}, "HTTP header name"),
        ({"/x": {"meter": "page.processed.basic", "header": " "}}, "HTTP header name"),
    ],
)
def test_bad_rules_raise_configuration_errors_naming_the_rule(
    rules: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RouteRules(rules)  # type: ignore[arg-type]


def test_unknown_meters_can_be_allowed() -> None:
    rules = RouteRules({"/x": "custom.meter"}, allow_unknown_meters=True)
    assert rules.match_route("GET", "/x")[0].meter_id == "custom.meter"


def test_callable_usage_is_kept() -> None:
    def pages(*args: object) -> int:
        return 7

    (spec,) = RouteRules({"/x": {"meter": "page.processed.basic", "usage": pages}}).match(
        "GET", "/x"
    )
    assert spec.usage is pages


def test_lookups_by_method_stay_bounded_whatever_methods_clients_send() -> None:
    rules = RouteRules({"POST /documents/{id}/scan": "page.processed.basic"})
    for i in range(200):
        assert rules.match(f"X{i}", "/documents/{}/scan") == ()
    assert rules.match("POST", "/documents/{}/scan")[0].meter_id == "page.processed.basic"
    assert len(rules._by_method) <= 32


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("GET /a/{id", r"routes\['GET /a/\{id'\]: unbalanced brace"),
        ("/a/id}/b", r"routes\['/a/id}/b'\]: unbalanced brace"),
        ("/a/{{id}}", r"routes\['/a/\{\{id}}'\]: unbalanced brace"),
        ("GET /a/{}", r"routes\['GET /a/\{}'\]: parameter '\{}' of '/a/\{}' has no name"),
        ("/a/{ }/b", r"routes\['/a/\{ }/b'\]: parameter '\{ }' .* has no name"),
        ("/a/{:int}", r"routes\['/a/\{:int}'\]: parameter '\{:int}' .* has no name"),
    ],
)
def test_a_template_with_an_unbalanced_or_empty_brace_is_refused_naming_the_key(
    key: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RouteRules({key: "page.processed.basic"})


@pytest.mark.parametrize(
    ("key", "fixed"),
    [
        ("post /a", "POST /a"),
        ("Get /reports/{kind}", "GET /reports/{kind}"),
        ("get,POST /a", "GET,POST /a"),
        ("websocket /ws/chat", "WEBSOCKET /ws/chat"),
        ("post documents:scan", "POST documents:scan"),  # a view name (Django)
    ],
)
def test_a_method_in_lower_case_is_refused_with_the_key_to_write(key: str, fixed: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RouteRules({key: "page.processed.basic"})
    assert str(caught.value) == f"routes[{key!r}]: methods are upper-case: write {fixed!r}"


def test_a_view_name_with_a_space_that_is_no_method_is_still_a_view_name() -> None:
    rules = RouteRules({"export all": "report.generated.large"})
    assert rules.match("GET", "export all")


@pytest.mark.parametrize(
    ("text", "usage"),
    [
        ("0", 0),
        ("7", 7),
        (" 7", 7),
        ("7\t ", 7),
        ("007", 7),
        (str(MAX_USAGE), MAX_USAGE),
        ("0" * 30 + "42", 42),
    ],
)
def test_a_usage_header_is_digits_only(text: str, usage: int) -> None:
    assert parse_usage_header("x-pages", text) == usage


@pytest.mark.parametrize(
    "text",
    [
        "2.5", "abc", "-1", "+3", "1_000", "1e3", "", "  ", "0x10", "1 2", "\u00b2", "\u0663",
        str(MAX_USAGE + 1), "9" * 5000, "7\n",
    ],
)  # fmt: skip
def test_a_usage_header_that_is_not_a_valid_usage_is_refused_naming_the_header(
    text: str,
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_usage_header("x-pages", text)
    assert caught.value.field == "total_usage"
    assert str(caught.value).startswith(
        f"total_usage: response header 'x-pages' must be an int from 0 to {MAX_USAGE}"
    )
    assert str(caught.value).endswith(f"got {text!r}")


@pytest.mark.parametrize("value", [None, b"7", 7])
def test_a_usage_header_value_that_is_not_a_str_is_the_same_invalid_event(value: object) -> None:
    # None: a header the response did not set (was a bare AttributeError)
    with pytest.raises(InvalidEvent) as caught:
        parse_usage_header("x-pages", value)  # type: ignore[arg-type]
    assert caught.value.field == "total_usage"
    assert str(caught.value) == (
        f"total_usage: response header 'x-pages' must be an int from 0 to {MAX_USAGE} "
        f"(digits only), got {value!r}"
    )
