"""Rules that no route of the app can match are reported at lifespan startup (a typo or a
missing prefix would otherwise leave a route unbilled without a word)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from meter_asgi import MeterMiddleware
from meter_asgi.rule_check import unmatched_rules
from meter_core import MeterClient, RouteRules
from tests.asgi_mw import apps
from tests.asgi_mw.live import LiveServer


def _rules(*keys: str) -> RouteRules:
    return RouteRules(dict.fromkeys(keys, "page.processed.basic"))


async def _ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def test_rules_that_match_routes_are_not_reported() -> None:
    assert unmatched_rules(apps.fastapi_app(), RouteRules(apps.FASTAPI_ROUTES)) == []
    assert unmatched_rules(apps.starlette_app(), RouteRules(apps.STARLETTE_ROUTES)) == []


def test_a_typo_and_a_missing_include_prefix_are_reported_with_the_closest_route() -> None:
    app = FastAPI()
    files = APIRouter()
    files.add_api_route("/{file_path:path}", _ok, methods=["GET"])
    app.include_router(files, prefix="/api/v1/files")
    app.add_api_route("/documents/{doc_id}/scan", _ok, methods=["POST"])
    messages = unmatched_rules(
        app,
        _rules("POST /documents/{id}/scan", "GET /api/v1/files/{p:path}",
               "POST /document/{id}/scan", "GET /files/{p:path}"),
    )  # fmt: skip
    assert messages == [
        "routes rule 'POST /document/{id}/scan' matches no route of the app, so it never "
        "meters; did you mean '/documents/{doc_id}/scan'?",
        "routes rule 'GET /files/{p:path}' matches no route of the app, so it never "
        "meters; did you mean '/api/v1/files/{file_path:path}'?",
    ]


def test_mounts_add_their_prefix_and_an_app_listing_no_routes_is_not_judged(
    tmp_path: Any,
) -> None:
    api = Starlette(routes=[Route("/docs/{doc_id}", _ok)])
    app = Starlette(routes=[Mount("/api", app=api),
                            Mount("/static", app=StaticFiles(directory=tmp_path))])  # fmt: skip
    messages = unmatched_rules(app, _rules("/api/docs/{id}", "/static/{x:path}", "/docs/{id}"))
    assert messages == [
        "routes rule '/docs/{id}' matches no route of the app, so it never meters; "
        "did you mean '/api/docs/{doc_id}'?"
    ]


def test_a_rule_for_a_method_its_route_does_not_accept_is_reported() -> None:
    app = FastAPI()
    app.add_api_route("/documents/{doc_id}/scan", _ok, methods=["POST"])
    app.add_api_route("/reports/{kind}", _ok, methods=["GET"])
    app.add_api_route("/reports/{kind}", _ok, methods=["PUT"])  # same template, other method
    messages = unmatched_rules(
        app,
        _rules("GET /documents/{id}/scan", "POST /documents/{id}/scan", "GET,PUT /reports/{k}",
               "DELETE /reports/{k}", "HEAD /reports/{k}", "/documents/{id}/scan",
               "WEBSOCKET /reports/{k}"),
    )  # fmt: skip
    assert messages == [
        "routes rule 'GET /documents/{id}/scan' never meters: the route "
        "'/documents/{doc_id}/scan' does not accept GET (it accepts POST)",
        "routes rule 'DELETE /reports/{k}' never meters: the route '/reports/{kind}' does "
        "not accept DELETE (it accepts GET, PUT)",
        # FastAPI answers HEAD on a GET route with 405 (Starlette accepts it, below)
        "routes rule 'HEAD /reports/{k}' never meters: the route '/reports/{kind}' does not "
        "accept HEAD (it accepts GET, PUT)",
        "routes rule 'WEBSOCKET /reports/{k}' never meters: the route '/reports/{kind}' is "
        "not a websocket route (it accepts GET, PUT)",
    ]


def test_starlette_head_on_get_routes_websocket_routes_and_any_method_endpoints() -> None:
    from starlette.endpoints import HTTPEndpoint

    class Anything(HTTPEndpoint):
        async def get(self, request: Any) -> PlainTextResponse:
            return PlainTextResponse("ok")

    async def chat(websocket: Any) -> None:
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/docs/{doc_id}", _ok),  # GET (and HEAD)
            Route("/things", Anything),  # an endpoint class: methods None
            Route("/probe", _ok, methods=["OPTIONS"]),
            WebSocketRoute("/ws/chat", chat),
        ]
    )
    messages = unmatched_rules(
        app,
        _rules("HEAD /docs/{id}", "POST /things", "WEBSOCKET /ws/chat", "GET /ws/chat",
               "/probe", "WEBSOCKET /docs/{id}", "POST /docs/{id}"),
    )  # fmt: skip
    assert sorted(messages or ()) == [
        "routes rule '/probe' never meters: the route '/probe' accepts OPTIONS only, which "
        "a rule without methods does not meter",
        "routes rule 'POST /docs/{id}' never meters: the route '/docs/{doc_id}' does not "
        "accept POST (it accepts GET, HEAD)",
        "routes rule 'WEBSOCKET /docs/{id}' never meters: the route '/docs/{doc_id}' is not "
        "a websocket route (it accepts GET, HEAD)",
    ]


def test_a_bare_asgi_app_has_no_routes_to_check() -> None:
    assert unmatched_rules(apps.bare_app, _rules("/anything")) is None


def test_the_report_is_logged_once_at_lifespan_startup(
    serve: Callable[..., LiveServer], meter_client: MeterClient, caplog: pytest.LogCaptureFixture
) -> None:
    app = apps.fastapi_app()
    routes = {**apps.FASTAPI_ROUTES, "POST /documents/{doc_id}/scans": "page.processed.basic"}
    app.add_middleware(MeterMiddleware, client=meter_client, routes=routes, tenant="acme")
    with caplog.at_level("WARNING", logger="meter.asgi"):
        serve(app, lifespan="on").stop()
    reported = sorted(r.getMessage() for r in caplog.records if "never meters" in r.getMessage())
    assert reported == [
        "routes rule 'POST /documents/{doc_id}/scans' matches no route of the app, so it "
        "never meters; did you mean '/documents/{doc_id}/scan'?"
    ]
