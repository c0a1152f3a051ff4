"""Where tenant and device ids come from, and why a client-sent header cannot choose
the tenant."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from meter_asgi import (
    MeterMiddleware,
    Resolver,
    from_header,
    from_path_param,
    from_state,
    from_user,
)
from meter_core import ConfigurationError, MeterClient
from meter_core.devserver import DevServer
from tests.asgi_mw import apps
from tests.asgi_mw.conftest import marker_then_values, wait_for_records
from tests.asgi_mw.live import LiveServer

SCAN = "/documents/d-1/scan"


def serve_fastapi(serve: Callable[..., LiveServer], client: MeterClient, **options: Any) -> Any:
    app = apps.fastapi_app()
    app.add_middleware(apps.FakeAuth)
    app.add_middleware(MeterMiddleware, client=client, routes=apps.FASTAPI_ROUTES, **options)
    return serve(app)


# -- unit: the resolvers themselves ----------------------------------------------------


def test_from_header_without_trusted_refuses_and_says_why() -> None:
    with pytest.raises(ConfigurationError, match="forged by any client"):
        from_header("x-tenant-id")
    with pytest.raises(ConfigurationError, match="trusted=True"):
        from_header("x-tenant-id", trusted="yes")  # type: ignore[arg-type]


def test_from_header_trusted_reads_the_header_case_insensitively() -> None:
    resolve = from_header("X-Tenant-Id", trusted=True)
    assert isinstance(resolve, Resolver)
    assert resolve({"headers": [(b"x-tenant-id", b" acme ")]}) == "acme"
    assert resolve({"headers": []}) is None
    # two different copies: which one did the gateway set? Neither is used.
    two = [(b"x-tenant-id", b"acme"), (b"x-tenant-id", b"evil")]
    assert resolve({"headers": two}) is None


def test_from_header_reads_a_utf8_id_as_utf8_and_other_bytes_as_latin1() -> None:
    # a gateway's "café" was billed as "cafÃ©", while the lookup header goes out in UTF-8
    resolve = from_header("X-Tenant-Id", trusted=True)
    assert resolve({"headers": [(b"x-tenant-id", "café".encode())]}) == "café"
    assert resolve({"headers": [(b"x-tenant-id", b"caf\xe9")]}) == "café"


def test_from_user_reads_the_authenticated_user_only() -> None:
    resolve = from_user("tenant_id")
    assert resolve({"user": apps.User("acme")}) == "acme"
    assert resolve({"user": {"tenant_id": "globex"}}) == "globex"
    assert resolve({}) is None

    class Anonymous:
        is_authenticated = False
        tenant_id = "acme"

    assert resolve({"user": Anonymous()}) is None


def test_from_user_follows_a_dotted_path_as_django_user_attr_does() -> None:
    class Org:
        tenant_id = "acme"

    class User:
        is_authenticated = True
        org = Org()

    resolve = from_user("org.tenant_id")
    assert resolve({"user": User()}) == "acme"
    assert resolve({"user": {"org": {"tenant_id": "globex"}}}) == "globex"
    # a user holding the dotted name itself (a claim named so) is read that way first
    assert resolve({"user": {"org.tenant_id": "initech", "org": {"tenant_id": "x"}}}) == "initech"
    assert resolve({"user": {"org": None}}) is None
    assert resolve({"user": {}}) is None
    assert resolve.explain({"user": {"org": None}}).endswith("the user (dict) has no 'org'")
    assert resolve.explain({"user": {"org": {"tenant_id": ""}}}).endswith(
        "the user (dict, at 'org') has an empty 'tenant_id'"
    )
    User.org = object()  # type: ignore[assignment]
    assert resolve({"user": User()}) is None
    assert resolve.explain({"user": User()}) == (
        "from_user('org.tenant_id'): the user (User, at 'org') has no 'tenant_id'"
    )


def test_resolvers_turn_ints_and_uuids_into_ids_and_refuse_other_types() -> None:
    ident = uuid.uuid4()
    assert from_path_param("t")({"path_params": {"t": 7}}) == "7"
    assert from_path_param("t")({"path_params": {"t": ident}}) == str(ident)
    with pytest.raises(TypeError, match="not an id"):
        from_path_param("t")({"path_params": {"t": 1.5}})


@pytest.mark.parametrize("bad", ["", "  ", None, 3])
def test_resolver_names_are_checked(bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        from_user(bad)
    with pytest.raises(ConfigurationError):
        from_path_param(bad)
    with pytest.raises(ConfigurationError):
        from_state(bad)


def test_from_state_reads_what_the_app_put_on_request_state() -> None:
    assert from_state("tenant_id")({"state": {"tenant_id": "acme"}}) == "acme"
    nested = from_state("user.tenant_id")
    assert nested({"state": {"user": apps.User("globex")}}) == "globex"
    assert nested({"state": {"user": {"tenant_id": "initech"}}}) == "initech"
    # any missing step: no id (the request is counted as untenanted)
    assert nested({"state": {}}) is None
    assert nested({"state": {"user": None}}) is None
    assert nested({}) is None
    with pytest.raises(ConfigurationError, match="empty step"):
        from_state("user..tenant_id")


@pytest.mark.parametrize(
    "name", ["X\n", "x-tenant\r\n", "x tenant", "x-tenant:", "x-t\u00e9nant", "x\x00id"]
)
def test_from_header_refuses_a_name_no_header_can_have(name: str) -> None:
    # "X\n" was read as "X"; the others built a resolver that never matched (or raised
    # UnicodeEncodeError naming nothing)
    with pytest.raises(ConfigurationError, match=r"^from_header\(name\): ") as caught:
        from_header(name, trusted=True)
    assert "not printable" in str(caught.value) or "not a valid header name" in str(caught.value)
    # spaces at the ends are still forgiven
    assert from_header(" X-Tenant-Id ", trusted=True)({"headers": [(b"x-tenant-id", b"a")]}) == "a"


@pytest.mark.parametrize("attr", ["a..b", ".tenant_id", "tenant_id.", "user. tenant_id", "a\tb"])
def test_attribute_paths_with_an_empty_or_blank_step_are_refused(attr: str) -> None:
    for make, label in ((from_user, "from_user(attr)"), (from_state, "from_state(attr)")):
        with pytest.raises(ConfigurationError, match=re.escape(label)):
            make(attr)
    with pytest.raises(ConfigurationError, match="empty step"):
        from_user("a..b")
    # a mapping user's key may hold dots and slashes (a namespaced claim)
    claim = "https://acme.example/tenant"
    assert from_user(claim)({"user": {claim: "acme"}}) == "acme"
    assert (
        from_user(claim)
        .explain({"user": {claim: ""}})
        .endswith(f"the user (dict) has an empty {claim!r}")
    )


@pytest.mark.parametrize("name", ["tenant:str", "{tenant}", "<tenant>", "tenant id", "t\n"])
def test_from_path_param_refuses_what_no_route_parameter_is_named(name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^from_path_param\(name\): "):
        from_path_param(name)


# -- served: which tenant is billed ----------------------------------------------------


def test_default_tenant_is_the_authenticated_users(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    server = serve_fastapi(serve, meter_client)
    assert http.post(server.url + SCAN, headers={"x-test-user": "acme"}).is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert value["tenant_id"] == "acme"


def test_a_forged_tenant_header_does_not_change_the_tenant(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    server = serve_fastapi(serve, meter_client, tenant=from_user("tenant_id"))
    forged = {"x-test-user": "acme", "x-tenant-id": "victim", "x-meter-tenant": "victim"}
    assert http.post(server.url + SCAN, headers=forged).is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert value["tenant_id"] == "acme"
    assert "victim" not in meter_backend.lookups


def test_a_trusted_gateway_header_sets_the_tenant(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    server = serve_fastapi(serve, meter_client, tenant=from_header("x-gw-tenant", trusted=True))
    assert http.post(server.url + SCAN, headers={"x-gw-tenant": "initech"}).is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert value["tenant_id"] == "initech"


def test_tenant_set_on_request_state_by_a_fastapi_dependency(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    def authenticate(request: Request) -> None:  # stands in for checking a token
        tenant = request.headers.get("x-test-user")
        request.state.user = apps.User(tenant) if tenant else None

    app = FastAPI(dependencies=[Depends(authenticate)])

    @app.post("/documents/{doc_id}/scan")
    async def scan(doc_id: str) -> dict[str, str]:
        return {"scanned": doc_id}

    app.add_middleware(
        MeterMiddleware,
        client=meter_client,
        routes={"POST /documents/{doc_id}/scan": "page.processed.basic"},
        tenant=from_state("user.tenant_id"),
    )
    server = serve(app)
    assert http.post(server.url + SCAN, headers={"x-test-user": "hooli"}).is_success
    assert http.post(server.url + SCAN).is_success  # no user: not metered
    (value,) = wait_for_records(meter_backend, 1)
    assert value["tenant_id"] == "hooli"
    middleware = app.middleware_stack
    while not isinstance(middleware, MeterMiddleware):
        middleware = middleware.app
    assert middleware.stats["untenanted"] == 1


def test_tenant_from_a_path_parameter_and_device_from_a_callable(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    app = apps.starlette_app()
    app.add_middleware(
        MeterMiddleware,
        client=meter_client,
        routes=apps.STARLETTE_ROUTES,
        tenant=from_path_param("tenant"),
        device=lambda scope: f"node-{scope['method'].lower()}",
    )
    server = serve(app)
    assert http.post(f"{server.url}/api/tenants/umbrella/docs").is_success
    (value,) = wait_for_records(meter_backend, 1)
    assert (value["tenant_id"], value["device_id"]) == ("umbrella", "node-post")


def test_a_request_without_tenant_is_not_metered_but_counted_and_logged(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = apps.FakeAuth(
        MeterMiddleware(apps.fastapi_app(), client=meter_client, routes=apps.FASTAPI_ROUTES)
    )
    server = serve(app)
    with caplog.at_level("WARNING", logger="meter.asgi"):
        for _ in range(3):
            assert http.post(server.url + SCAN).is_success  # no user: no tenant
        assert marker_then_values(meter_backend, http, f"{server.url}/marker") == []
    middleware = app.app
    assert middleware.stats["untenanted"] == 3
    assert middleware.stats["metered_requests"] == 1  # the marker
    # logged once (rate limited), not once per request
    lines = [r for r in caplog.records if "no tenant id" in r.getMessage()]
    assert len(lines) == 1
    assert "POST /documents/d-1/scan" in lines[0].getMessage()
    # the line says why: which resolver, and what it did not find
    assert "from_user('tenant_id'): the scope has no \"user\"" in lines[0].getMessage()


def test_the_no_tenant_line_names_what_the_user_lacks() -> None:
    resolver = from_user("tenant_id")
    assert resolver.explain({"user": apps.User("")}) == (
        "from_user('tenant_id'): the user (User) has an empty 'tenant_id'"
    )
    assert resolver.explain({"user": object()}).endswith("the user (object) has no 'tenant_id'")
    assert resolver.explain({"user": {"tenant_id": ""}}).endswith("has an empty 'tenant_id'")

    class Anonymous:
        is_authenticated = False

    assert resolver.explain({"user": Anonymous()}).endswith(
        "the user (Anonymous) is not authenticated"
    )
    assert from_state("tenant").explain({}) == "from_state('tenant'): gave none"


def test_an_invalid_tenant_id_is_not_metered_and_counted(
    serve: Callable[..., LiveServer],
    meter_client: MeterClient,
    meter_backend: DevServer,
    http: httpx.Client,
) -> None:
    middleware = MeterMiddleware(
        apps.fastapi_app(), client=meter_client, routes=apps.FASTAPI_ROUTES
    )
    server = serve(apps.FakeAuth(middleware))
    assert http.post(server.url + SCAN, headers={"x-test-user": "x" * 500}).is_success
    assert marker_then_values(meter_backend, http, f"{server.url}/marker") == []
    assert middleware.stats["invalid"] == 1
