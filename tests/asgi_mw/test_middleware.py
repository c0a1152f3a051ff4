"""MeterMiddleware on HTTP requests, served by uvicorn, metering into the local backend."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meter_asgi import MeterMiddleware
from meter_core import MeterClient
from meter_core.devserver import DevServer
from meter_core.events import MAX_USAGE
from tests.asgi_mw import apps
from tests.asgi_mw.conftest import marker_then_values, settled, wait_for_records
from tests.asgi_mw.live import LiveServer

ACME = {"x-test-user": "acme"}


@pytest.fixture
def fastapi_server(serve: Callable[..., LiveServer], meter_client: MeterClient) -> LiveServer:
    app = apps.fastapi_app()
    app.add_middleware(apps.FakeAuth)
    app.add_middleware(MeterMiddleware, client=meter_client, routes=apps.FASTAPI_ROUTES)
    return serve(app)


def test_metered_route_records_one_event_with_tenant_device_and_customer(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    response = http.post(f"{fastapi_server.url}/documents/d-1/scan", headers=ACME)
    assert response.json() == {"scanned": "d-1"}
    (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "page.processed.basic"
    assert value["total_usage"] == 1
    assert value["tenant_id"] == "acme"
    assert value["customer_id"] == "cust-acme"
    assert value["device_id"] == "test-device"


def test_each_call_is_one_event(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    for doc in ("a", "b", "c"):
        assert http.post(f"{fastapi_server.url}/documents/{doc}/scan", headers=ACME).is_success
    values = wait_for_records(meter_backend, 3)
    assert [v["meter_id"] for v in values] == ["page.processed.basic"] * 3
    assert len({v["event_id"] for v in values}) == 3


def test_other_method_on_the_same_route_is_not_metered(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.get(f"{fastapi_server.url}/documents/d-1/scan", headers=ACME).is_success
    assert marker_then_values(meter_backend, http, f"{fastapi_server.url}/marker") == []


@pytest.mark.parametrize(("path", "status"), [("/missing", 404), ("/broken", 503)])
def test_error_statuses_are_not_metered(
    fastapi_server: LiveServer,
    meter_backend: DevServer,
    http: httpx.Client,
    path: str,
    status: int,
) -> None:
    assert http.post(fastapi_server.url + path, headers=ACME).status_code == status
    assert marker_then_values(meter_backend, http, f"{fastapi_server.url}/marker") == []


def test_an_exception_in_the_app_is_not_metered_and_still_reaches_the_server(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    # uvicorn drops the connection after an app exception: do not reuse it for the marker
    response = http.post(f"{fastapi_server.url}/crash", headers={**ACME, "connection": "close"})
    assert response.status_code == 500
    assert marker_then_values(meter_backend, http, f"{fastapi_server.url}/marker") == []


def test_unmatched_route_is_not_metered(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.get(f"{fastapi_server.url}/unmetered", headers=ACME).is_success
    assert http.get(f"{fastapi_server.url}/no-such-route", headers=ACME).status_code == 404
    assert marker_then_values(meter_backend, http, f"{fastapi_server.url}/marker") == []


def test_streaming_response_streams_and_is_metered_once_complete(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    started = time.monotonic()
    with http.stream("GET", f"{fastapi_server.url}/stream", headers=ACME) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = b"".join(chunks)
    assert first + rest == b"first,second"
    # The first chunk left before the handler's pause: the body was not buffered.
    assert first.startswith(b"first,") and first_at < apps.STREAM_PAUSE * 0.8
    (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "report.generated.large"


def test_usage_from_a_response_header_which_is_stripped(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    response = http.post(f"{fastapi_server.url}/pages", headers=ACME)
    assert "x-meter-pages" not in response.headers
    assert response.headers["x-other"] == "kept"
    (value,) = wait_for_records(meter_backend, 1)
    assert (value["meter_id"], value["total_usage"]) == ("page.processed.advanced", 7)


def test_several_meters_on_one_route(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.post(f"{fastapi_server.url}/multi", headers=ACME).is_success
    values = wait_for_records(meter_backend, 2)
    assert sorted((v["meter_id"], v["total_usage"]) for v in values) == [
        ("report.generated.small", 1),
        ("rule.executed.small", 3),
    ]


def test_usage_callable_gets_scope_status_and_response_headers(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.post(f"{fastapi_server.url}/count", headers=ACME).status_code == 201
    (value,) = wait_for_records(meter_backend, 1)
    assert (value["meter_id"], value["total_usage"]) == ("template.processed.count", 8)


def test_handler_usage_through_depends_meter_usage(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.post(f"{fastapi_server.url}/handler", headers=ACME).is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "chat.query.time_secs"
    assert value["total_usage"] == 12
    assert value["metadata"] == {"model": "small"}
    assert value["tenant_id"] == "acme"


def test_handler_usage_of_a_failed_request_is_dropped(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.post(f"{fastapi_server.url}/handler-fail", headers=ACME).status_code == 400
    assert marker_then_values(meter_backend, http, f"{fastapi_server.url}/marker") == []


def test_route_of_an_included_router_matches_its_full_template(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    assert http.get(f"{fastapi_server.url}/v1/reports/weekly", headers=ACME).is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "report.generated.medium"
    assert value["metadata"] == {"api": "v1"}


def test_background_task_still_runs_and_the_request_is_metered(
    fastapi_server: LiveServer, meter_backend: DevServer, http: httpx.Client
) -> None:
    apps.background_done.clear()
    assert http.post(f"{fastapi_server.url}/background", headers=ACME).is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "report.generated.insights"
    assert apps.background_done == ["ran"]


def test_handler_usage_through_request_state_in_starlette(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    app = apps.starlette_app()
    app.add_middleware(MeterMiddleware, client=meter_client, tenant="acme")
    server = serve(app)
    assert http.post(f"{server.url}/usage").text == "ok"
    (value,) = wait_for_records(meter_backend, 1)
    assert (value["meter_id"], value["total_usage"]) == ("report.generated.dataquery", 5)
    assert value["metadata"] == {"q": "x"}


@pytest.mark.parametrize("head_rule", [False, True])
def test_handler_usage_of_a_head_request_is_billed_only_when_a_rule_names_head(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
    head_rule: bool,
) -> None:
    # Starlette answers HEAD on a GET route with the GET handler, which added its usage:
    # an uptime check's HEAD billed the tenant, while the route's rules skip HEAD.
    app = apps.starlette_app()
    routes: dict[str, Any] = {"POST /marker": "page.processed.basic"}
    if head_rule:
        routes["HEAD /usage-get"] = "report.generated.small"
    app.add_middleware(MeterMiddleware, client=meter_client, routes=routes)
    app.add_middleware(apps.FakeAuth)
    server = serve(app)
    assert http.head(f"{server.url}/usage-get", headers=ACME).status_code == 200
    assert http.request("OPTIONS", f"{server.url}/usage-get", headers=ACME).status_code == 405
    values = marker_then_values(meter_backend, http, f"{server.url}/marker")
    if head_rule:  # the rule's meter and the handler's usage
        assert sorted(v["meter_id"] for v in values) == [
            "report.generated.dataquery", "report.generated.small"
        ]  # fmt: skip
    else:
        assert values == []
    assert http.get(f"{server.url}/usage-get", headers=ACME).text == "ok"
    values = wait_for_records(meter_backend, len(values) + 2)
    assert values[-1]["meter_id"] == "report.generated.dataquery"  # a GET is billed


def test_route_of_a_mounted_app_matches_its_full_template(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    app = apps.starlette_app()
    app.add_middleware(
        MeterMiddleware, client=meter_client, routes=apps.STARLETTE_ROUTES, tenant="acme"
    )
    server = serve(app)
    assert http.post(f"{server.url}/api/tenants/t1/docs").is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "page.processed.basic"


def test_a_request_metered_by_two_nested_middlewares_is_counted_and_logged(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    api = Starlette(routes=[Route("/tenants/{tenant}/docs", apps.tenant_doc, methods=["POST"])])
    inner = MeterMiddleware(
        api, client=meter_client, tenant="acme",  # its rules are relative to its mount
        routes={"POST /tenants/{tenant}/docs": "page.processed.advanced"},
    )  # fmt: skip
    outer = MeterMiddleware(
        Starlette(routes=[Route("/marker", apps.marker, methods=["POST"]),
                          Mount("/api", app=inner)]),
        client=meter_client, tenant="acme",
        routes={"POST /api/tenants/{tenant}/docs": "page.processed.basic",
                "POST /marker": "template.licensed.total"},
    )  # fmt: skip
    server = serve(outer, lifespan="off")
    with caplog.at_level("WARNING", logger="meter.asgi"):
        assert http.post(f"{server.url}/marker").is_success  # the outer one only
        assert http.post(f"{server.url}/api/tenants/t1/docs").is_success  # both
    values = wait_for_records(meter_backend, 3)
    assert sorted(v["meter_id"] for v in values) == [
        "page.processed.advanced", "page.processed.basic", "template.licensed.total"
    ]  # fmt: skip
    assert outer.stats["metered_twice"] == 1
    assert inner.stats["metered_twice"] == 0
    assert "POST /api/tenants/t1/docs was metered by two MeterMiddleware" in caplog.text


def test_a_path_route_in_nested_mounts_gets_the_rule_of_its_full_template(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def download(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.path_params["rest"])

    files = Starlette(routes=[Route("/{rest:path}", download)])
    app = Starlette(routes=[Mount("/api", routes=[Mount("/files", app=files)])])
    app.add_middleware(
        MeterMiddleware,
        client=meter_client,
        tenant="acme",
        routes={
            "GET /api/files/{rest:path}": "page.processed.basic",
            # the template alone also fits after /api: this rule must not be the one used
            "GET /api/{x}": "page.processed.advanced",
        },
    )
    server = serve(app)
    assert http.get(f"{server.url}/api/files/a/b").text == "a/b"
    assert http.get(f"{server.url}/api/files/c").text == "c"
    values = wait_for_records(meter_backend, 2)
    assert [v["meter_id"] for v in values] == ["page.processed.basic"] * 2


def test_bare_asgi_app_is_matched_by_path(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    app = MeterMiddleware(
        apps.bare_app,
        client=meter_client,
        tenant="acme",
        routes={
            "POST /documents/{doc_id}/scan": "page.processed.basic",
            "/nowhere/{x}": "page.processed.basic",
            "POST /marker": "template.licensed.total",
        },
    )
    server = serve(app, lifespan="off")
    assert http.post(f"{server.url}/documents/42/scan").text == "bare"
    assert http.get(f"{server.url}/documents/42/scan").is_success  # other method
    assert http.post(f"{server.url}/documents/42/other").is_success  # other path
    assert http.post(f"{server.url}/nowhere/1").status_code == 404  # not a success
    values = wait_for_records(meter_backend, 1)
    assert http.post(f"{server.url}/marker").is_success
    values = wait_for_records(meter_backend, 2)
    assert [v["meter_id"] for v in values] == ["page.processed.basic", "template.licensed.total"]
    assert app.stats["metered_requests"] == 2


def test_success_statuses_are_configurable(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    app = MeterMiddleware(
        apps.bare_app,
        client=meter_client,
        tenant="acme",
        routes={"/{any:path}": "page.processed.basic"},
        success_statuses={404},
    )
    server = serve(app, lifespan="off")
    assert http.get(f"{server.url}/found").is_success
    assert http.get(f"{server.url}/nowhere/x").status_code == 404
    (value,) = wait_for_records(meter_backend, 1)
    time.sleep(0.1)
    assert len(settled(meter_backend, meter_client)) == 1
    assert value["meter_id"] == "page.processed.basic"
    assert app.stats["metered_requests"] == 1


def test_a_broken_usage_callable_is_logged_and_never_breaks_the_request(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(scope: Any, status: int, headers: Any) -> int:
        raise ZeroDivisionError("oops")

    app = MeterMiddleware(
        apps.bare_app,
        client=meter_client,
        tenant="acme",
        device="web-1",
        routes={
            "POST /a": [{"meter": "page.processed.basic", "usage": broken}, "rule.executed.large"]
        },
    )
    server = serve(app, lifespan="off")
    with caplog.at_level("ERROR", logger="meter.asgi"):
        assert http.post(f"{server.url}/a").text == "bare"
        (value,) = wait_for_records(meter_backend, 1)
    assert value["meter_id"] == "rule.executed.large"
    assert value["device_id"] == "web-1"
    assert app.stats["errors"] == 1
    assert "ZeroDivisionError" in caplog.text


def test_djangos_asgi_handler_is_metered_by_path(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    from django.core.asgi import get_asgi_application

    # Django puts no route in the scope: the request path is matched against the rules
    app = MeterMiddleware(
        get_asgi_application(),
        client=meter_client,
        tenant="acme",
        routes={
            "GET /ok/": "page.processed.basic",
            "/documents/{pk}/scan": "page.processed.advanced",
            "/failing/": "report.generated.small",
        },
    )
    server = serve(app, lifespan="off")
    # not metered first, so that they were handled when the metered ones' records arrive
    assert http.get(f"{server.url}/failing/").status_code == 400  # not a success
    assert http.post(f"{server.url}/ok/").is_success  # another method
    assert http.get(f"{server.url}/ok/").text == "ok"
    assert http.get(f"{server.url}/documents/7/scan").text == "scanned"
    wait_for_records(meter_backend, 2)
    values = settled(meter_backend, meter_client)
    assert [v["meter_id"] for v in values] == ["page.processed.basic", "page.processed.advanced"]
    assert app.stats["metered_requests"] == 2


def test_a_cors_preflight_is_not_billed_by_a_rule_without_methods(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    from starlette.middleware.cors import CORSMiddleware

    origin = "https://app.example"
    app = apps.fastapi_app()
    # inside the metering middleware, so it answers the preflight before any route runs
    app.add_middleware(CORSMiddleware, allow_origins=[origin], allow_methods=["*"],
                       allow_headers=["*"])  # fmt: skip
    app.add_middleware(apps.FakeAuth)
    app.add_middleware(
        MeterMiddleware,
        client=meter_client,
        routes={
            "/documents/{doc_id}/scan": "page.processed.basic",  # any method...
            "POST /marker": "template.licensed.total",
        },
    )
    server = serve(app)
    url = f"{server.url}/documents/d-1/scan"
    preflight = http.options(
        url,
        headers={"origin": origin, "access-control-request-method": "POST",
                 "access-control-request-headers": "x-test-user", **ACME},
    )  # fmt: skip
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert http.post(url, headers={"origin": origin, **ACME}).is_success
    values = marker_then_values(meter_backend, http, f"{server.url}/marker")
    # ...but OPTIONS: the preflight did no work, only the call itself is billed
    assert [(v["meter_id"], v["tenant_id"]) for v in values] == [("page.processed.basic", "acme")]


def _pages_and_one_rule(pages: dict[str, Any], client: MeterClient) -> MeterMiddleware:
    """POST /pages metered by ``pages`` and by one rule.executed.small."""
    return MeterMiddleware(
        apps.usage_header_app,
        client=client,
        tenant="acme",
        routes={"POST /pages": [pages, "rule.executed.small"]},
    )


def test_a_usage_header_that_is_not_a_valid_usage_drops_that_meter_only(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the same strings as meter_django refuses: both read the header with parse_usage_header
    refused = [str(MAX_USAGE + 1), "+3", "1_000", "2.5", "-1", "abc", ""]
    accepted = {" 4\t": 4, str(MAX_USAGE): MAX_USAGE}
    pages = {"meter": "page.processed.advanced", "header": "x-meter-pages"}
    app = _pages_and_one_rule(pages, meter_client)
    server = serve(app, lifespan="off")
    with caplog.at_level("WARNING", logger="meter.asgi"):
        for value in [*refused, *accepted]:
            response = http.post(f"{server.url}/pages", params={"pages": value})
            assert response.text == "pages"
            assert "x-meter-pages" not in response.headers
        expected = len(refused) + 2 * len(accepted)
        wait_for_records(meter_backend, expected)
    values = settled(meter_backend, meter_client)
    # every request is billed for its other meter; the header meter only when valid
    assert sorted((v["meter_id"], v["total_usage"]) for v in values) == sorted(
        [("rule.executed.small", 1)] * (len(refused) + len(accepted))
        + [("page.processed.advanced", usage) for usage in accepted.values()]
    )
    assert app.stats["invalid"] == len(refused)
    assert app.stats["metered_requests"] == len(refused) + len(accepted)
    # (rate limited: the first one is logged)
    assert (
        "usage of 'page.processed.advanced' not recorded: total_usage: response header "
        f"'x-meter-pages' must be an int from 0 to {MAX_USAGE} (digits only), "
        f"got '{MAX_USAGE + 1}'"
    ) in caplog.text


def test_a_usage_callable_out_of_range_drops_that_meter_only(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    runaway = {"meter": "page.processed.advanced", "usage": lambda *_: MAX_USAGE + 1}
    app = _pages_and_one_rule(runaway, meter_client)
    server = serve(app, lifespan="off")
    assert http.post(f"{server.url}/pages").status_code == 200
    wait_for_records(meter_backend, 1)
    values = settled(meter_backend, meter_client)
    assert [(v["meter_id"], v["total_usage"]) for v in values] == [("rule.executed.small", 1)]
    assert app.stats["invalid"] == 1
