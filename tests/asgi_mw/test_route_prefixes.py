"""Rules for ``{x:path}`` routes reached under a prefix the route's own template lacks: a
FastAPI router included with a prefix (FastAPI puts the router's original route, without
the include prefix, in ``scope["route"]``), nested includes, and a FastAPI app mounted in
a Starlette app. Served by uvicorn, metering into the local backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from meter_asgi import MeterMiddleware
from meter_asgi.routes import RouteMatcher, compile_routes
from meter_core import MeterClient
from meter_core.devserver import DevServer
from tests.asgi_mw.conftest import settled, wait_for_records
from tests.asgi_mw.live import LiveServer

BASIC = "page.processed.basic"
ADVANCED = "page.processed.advanced"
SMALL = "report.generated.small"
LARGE = "report.generated.large"


def files_router() -> APIRouter:
    """A router whose :path route is its whole template: "/{file_path:path}"."""
    files = APIRouter()

    @files.get("/{file_path:path}")
    async def download(file_path: str) -> dict[str, str]:
        return {"file": file_path}

    return files


def add_catch_all(app: FastAPI) -> None:
    @app.get("/{rest:path}")
    async def spa(rest: str) -> dict[str, str]:
        return {"spa": rest}


def billed(
    server: LiveServer,
    backend: DevServer,
    client: MeterClient,
    http: httpx.Client,
    requests: list[tuple[str, dict[str, str]]],
) -> list[str]:
    """GET each path (checking the app's answer) one after the other, and return the
    meter of each, or "nothing" for a request that billed nothing."""
    got: list[str] = []
    already = 0
    for path, body in requests:
        response = http.get(server.url + path)
        assert response.status_code == 200 and response.json() == body, (path, response.text)
        try:
            values = wait_for_records(backend, already + 1, timeout=3)
        except AssertionError:
            got.append("nothing")
            continue
        got.append(values[already]["meter_id"])
        already += 1
    assert len(settled(backend, client)) == already  # one event per billed request
    return got


def metered(app: Any, client: MeterClient, routes: dict[str, Any]) -> MeterMiddleware:
    return MeterMiddleware(app, client=client, tenant="acme", routes=routes)


def test_a_path_route_of_a_router_included_with_a_prefix(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    app = FastAPI()
    app.include_router(files_router(), prefix="/api/v1/files")
    server = serve(
        metered(app, meter_client, {"GET /api/v1/files/{file_path:path}": BASIC}),
        lifespan="off",
    )
    got = billed(
        server,
        meter_backend,
        meter_client,
        http,
        [
            ("/api/v1/files/report.pdf", {"file": "report.pdf"}),
            ("/api/v1/files/a/b.pdf", {"file": "a/b.pdf"}),
        ],
    )
    assert got == [BASIC, BASIC]


def test_a_prefixed_path_route_is_not_taken_for_a_root_catch_all(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    app = FastAPI()
    app.include_router(files_router(), prefix="/api/v1/files")
    add_catch_all(app)
    routes = {"GET /api/v1/files/{file_path:path}": BASIC, "GET /{rest:path}": SMALL}
    server = serve(metered(app, meter_client, routes), lifespan="off")
    got = billed(
        server,
        meter_backend,
        meter_client,
        http,
        [
            ("/api/v1/files/a/b.pdf", {"file": "a/b.pdf"}),
            ("/home", {"spa": "home"}),
            ("/api/v1/files/c.pdf", {"file": "c.pdf"}),
            ("/docs/x/y", {"spa": "docs/x/y"}),
            ("/api/v1/other", {"spa": "api/v1/other"}),
        ],
    )
    assert got == [BASIC, SMALL, BASIC, SMALL, SMALL]


def test_a_path_route_of_nested_includes_gets_every_prefix(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    v1 = APIRouter(prefix="/v1")

    @v1.get("/{doc_id}")
    async def doc(doc_id: str) -> dict[str, str]:
        return {"doc": doc_id}

    v1.include_router(files_router(), prefix="/files")
    app = FastAPI()
    app.include_router(v1, prefix="/api")
    add_catch_all(app)
    routes = {
        "GET /api/v1/files/{file_path:path}": BASIC,
        "GET /api/v1/{doc_id}": ADVANCED,
        "GET /{rest:path}": SMALL,
    }
    server = serve(metered(app, meter_client, routes), lifespan="off")
    got = billed(
        server,
        meter_backend,
        meter_client,
        http,
        [
            ("/api/v1/files/a/b/c.txt", {"file": "a/b/c.txt"}),
            ("/api/v1/d1", {"doc": "d1"}),
            ("/api/v1/files/x", {"file": "x"}),
            ("/elsewhere", {"spa": "elsewhere"}),
        ],
    )
    assert got == [BASIC, ADVANCED, BASIC, SMALL]


def test_a_path_route_inside_a_starlette_mount(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    async def asset(request: Request) -> JSONResponse:
        return JSONResponse({"asset": request.path_params["rest"]})

    # a FastAPI service with an included :path router, mounted at /svc: the mount puts
    # /svc in root_path, the include prefix (/files) is nowhere but in the path
    service = FastAPI()
    service.include_router(files_router(), prefix="/files")
    add_catch_all(service)
    app = Starlette(
        routes=[Mount("/svc", app=service), Mount("/static", routes=[Route("/{rest:path}", asset)])]
    )
    routes = {
        "GET /svc/files/{file_path:path}": BASIC,
        "GET /svc/{rest:path}": SMALL,
        "GET /static/{rest:path}": LARGE,
    }
    server = serve(metered(app, meter_client, routes), lifespan="off")
    got = billed(
        server,
        meter_backend,
        meter_client,
        http,
        [
            ("/svc/files/a/b", {"file": "a/b"}),
            ("/svc/other/page", {"spa": "other/page"}),
            ("/static/css/site.css", {"asset": "css/site.css"}),
            ("/svc/files/c", {"file": "c"}),
        ],
    )
    assert got == [BASIC, SMALL, LARGE, BASIC]


def test_one_path_route_object_at_several_depths_and_prefixes(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    # One router included twice: FastAPI routes both prefixes to the same route object,
    # so an answer kept for that object must hold for every depth and prefix it sees.
    files = files_router()
    app = FastAPI()
    app.include_router(files, prefix="/a")
    app.include_router(files, prefix="/b")
    routes = {"GET /a/{p:path}": BASIC, "GET /b/{p:path}": ADVANCED}
    server = serve(metered(app, meter_client, routes), lifespan="off")
    got = billed(
        server,
        meter_backend,
        meter_client,
        http,
        [
            ("/a/x", {"file": "x"}),
            ("/a/x/y/z", {"file": "x/y/z"}),
            ("/b/x", {"file": "x"}),
            ("/a/x", {"file": "x"}),
            ("/b/x/y", {"file": "x/y"}),
            ("/a/", {"file": ""}),
            ("/b/x/y", {"file": "x/y"}),
        ],
    )
    assert got == [BASIC, BASIC, ADVANCED, BASIC, ADVANCED, BASIC, ADVANCED]


class FakeRoute:
    def __init__(self, path: str) -> None:
        self.path = path


def test_the_path_params_say_where_a_path_template_starts() -> None:
    rules = compile_routes(
        {"GET /files/{p:path}": BASIC, "GET /{rest:path}": SMALL, "GET /x/{a}/{p:path}": LARGE},
        allow_unknown_meters=False,
    )
    m = RouteMatcher(rules)
    route = FakeRoute("/{p:path}")

    def meters(path: str, scope: dict[str, Any]) -> list[str]:
        return [s.meter_id for s in m.specs("GET", {"route": route, **scope}, path, "")]

    assert meters("/files/a/b", {"path_params": {"p": "a/b"}}) == [BASIC]
    assert meters("/files/a/b", {"path_params": {"p": "files/a/b"}}) == [SMALL]
    assert meters("/files/", {"path_params": {"p": ""}}) == [BASIC]
    # a route with a segment parameter before its :path one, under a prefix
    other = FakeRoute("/{a}/{p:path}")
    scope = {"route": other, "path_params": {"a": "1", "p": "q/r"}}
    assert [s.meter_id for s in m.specs("GET", scope, "/x/1/q/r", "")] == [LARGE]
    # without path params (or with values that do not fit) the path is searched as before
    assert meters("/files/a/b", {}) == [SMALL]
    assert meters("/files/a/b", {"path_params": {"p": "zz/a/b/c/d"}}) == [SMALL]


def test_a_catch_all_rule_does_not_bill_routes_under_a_prefix_without_rules_of_their_own(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    items = APIRouter()

    @items.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    async def asset(request: Request) -> JSONResponse:
        return JSONResponse({"asset": request.path_params["rest"]})

    service = FastAPI()
    service.include_router(items, prefix="/api")
    service.include_router(files_router(), prefix="/api/files")
    add_catch_all(service)
    app = Starlette(routes=[Mount("/static", routes=[Route("/{rest:path}", asset)]),
                            Mount("", app=service)])  # fmt: skip
    routes = {"GET /api/files/{file_path:path}": BASIC, "GET /{rest:path}": SMALL}
    server = serve(metered(app, meter_client, routes), lifespan="off")
    got = billed(
        server,
        meter_backend,
        meter_client,
        http,
        [
            ("/api/items/3", {"item": "3"}),  # no rule of its own: not the catch-all's
            ("/static/site.css", {"asset": "site.css"}),  # the same, under a mount
            ("/api/files/a/b", {"file": "a/b"}),  # its own rule
            ("/about/us", {"spa": "about/us"}),  # the catch-all's own route
        ],
    )
    assert got == ["nothing", "nothing", BASIC, SMALL]
