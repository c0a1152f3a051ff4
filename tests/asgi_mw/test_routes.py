"""Compiling the routes= option, and finding a request's meters from the route the
framework resolved (or from its path)."""

from __future__ import annotations

from typing import Any

import pytest

from meter_asgi.routes import RouteMatcher, compile_routes
from meter_core import ConfigurationError


class FakeRoute:
    def __init__(self, path: str) -> None:
        self.path = path


def matcher(routes: dict[str, Any]) -> RouteMatcher:
    return RouteMatcher(compile_routes(routes, allow_unknown_meters=False))


def meters(m: RouteMatcher, method: str, path: str, template: str | None = None) -> list[str]:
    scope: dict[str, Any] = {} if template is None else {"route": FakeRoute(template)}
    return [spec.meter_id for spec in m.specs(method, scope, path, "")]


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"FETCH /a": "page.processed.basic"}, "unknown method 'FETCH'"),
        ({"POST documents:scan": "page.processed.basic"}, "not a route template"),
        ({"WEBSOCKET /ws": "chat.on.time_hours"}, "session meters only"),
        ({"/chat": {"meter": "chat.on.time_hours", "session": True}}, "websocket rule"),
        ({"GET,WEBSOCKET /ws": {"meter": "chat.on.time_hours", "session": True}}, "combined"),
        ({"POST /a": "document.basic.page"}, "unknown meter"),
        (["POST /a"], "mapping"),
    ],
)
def test_bad_rules_raise_configuration_error_naming_the_problem(routes: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        compile_routes(routes, allow_unknown_meters=False)


def test_unknown_meters_can_be_allowed() -> None:
    rules = compile_routes({"POST /a": "custom.meter"}, allow_unknown_meters=True)
    assert len(rules) == 1


def test_the_resolved_template_is_matched_not_the_path() -> None:
    m = matcher({"POST /items/{item_id}": "page.processed.basic"})
    assert meters(m, "POST", "/items/42", "/items/{item_id}") == ["page.processed.basic"]
    # /items/special is its own route in the app: the {item_id} rule does not apply
    assert meters(m, "POST", "/items/special", "/items/special") == []
    assert meters(m, "GET", "/items/42", "/items/{item_id}") == []


def test_a_template_without_its_router_prefix_gets_the_prefix_from_the_path() -> None:
    m = matcher({"GET /v1/reports/{kind}": "report.generated.small"})
    assert meters(m, "GET", "/v1/reports/x", "/reports/{kind}") == ["report.generated.small"]
    assert meters(m, "GET", "/v2/reports/x", "/reports/{kind}") == []


def test_the_prefix_of_a_mounted_route_comes_from_the_root_path_the_mounts_set() -> None:
    m = matcher(
        {"/api/files/{rest:path}": "page.processed.basic", "/api/{x}": "page.processed.advanced"}
    )
    route = FakeRoute("/{rest:path}")
    # the mounts (/api, then /files) added their prefixes to root_path; the template alone
    # would also fit after /api, which would be the wrong rule
    scope: dict[str, Any] = {"route": route, "root_path": "/base/api/files"}
    found = m.specs("GET", scope, "/base/api/files/a/b", "/base")
    assert [s.meter_id for s in found] == ["page.processed.basic"]


def test_a_route_seen_before_gives_the_same_meters_per_method() -> None:
    m = matcher({"POST /items/{item_id}": "page.processed.basic"})
    route = FakeRoute("/items/{item_id}")
    for _ in range(3):  # the first call compiles and remembers, the others hit the cache
        for method, expected in (("POST", ["page.processed.basic"]), ("GET", [])):
            found = m.specs(method, {"route": route}, "/items/7", "")
            assert [s.meter_id for s in found] == expected


def test_a_remembered_route_reached_under_a_prefix_is_not_taken_as_the_whole_path() -> None:
    m = matcher(
        {
            "GET /reports/{kind}": "report.generated.small",
            "GET /v1/reports/{kind}": "page.processed.basic",
        }
    )
    route = FakeRoute("/reports/{kind}")
    assert [s.meter_id for s in m.specs("GET", {"route": route}, "/reports/x", "")] == [
        "report.generated.small"
    ]
    # the same route object, reached by an app that strips /v1 without setting root_path
    found = m.specs("GET", {"route": route}, "/v1/reports/x", "")
    assert [s.meter_id for s in found] == ["page.processed.basic"]
    # ...and by a mount that did set root_path
    found = m.specs("GET", {"route": route, "root_path": "/v1"}, "/v1/reports/x", "")
    assert [s.meter_id for s in found] == ["page.processed.basic"]


def test_the_per_route_cache_stays_bounded_whatever_methods_clients_send() -> None:
    m = matcher({"POST /items/{item_id}": "page.processed.basic"})
    route = FakeRoute("/items/{item_id}")
    for n in range(200):
        assert m.specs(f"X{n}", {"route": route}, "/items/7", "") == ()
    assert [s.meter_id for s in m.specs("POST", {"route": route}, "/items/7", "")] == [
        "page.processed.basic"
    ]
    assert all(len(known.by_method) <= 16 for known in m._routes.values())


def test_without_a_resolved_route_the_path_is_matched() -> None:
    m = matcher({"POST /documents/{doc_id:int}/scan": "page.processed.basic"})
    assert meters(m, "POST", "/documents/9/scan") == ["page.processed.basic"]
    assert meters(m, "POST", "/documents/9/scan/more") == []


def test_websocket_rules_match_the_websocket_method_only() -> None:
    m = matcher({"WEBSOCKET /ws/chat": {"meter": "chat.on.time_hours", "session": True}})
    assert meters(m, "WEBSOCKET", "/ws/chat", "/ws/chat") == ["chat.on.time_hours"]
    assert meters(m, "GET", "/ws/chat", "/ws/chat") == []
