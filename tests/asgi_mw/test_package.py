"""The public surface of meter_asgi and its option checking."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import meter_asgi
from meter_asgi import MeterMiddleware, from_header
from meter_core import ConfigurationError, MeterClient, RequestUsage
from meter_core.devserver import DevServer
from tests.asgi_mw import apps
from tests.asgi_mw.live import LiveServer


def test_all_is_exactly_the_documented_api() -> None:
    assert sorted(meter_asgi.__all__) == sorted(
        ["MeterMiddleware", "meter_usage", "from_header", "from_user", "from_state",
         "from_path_param", "Resolver"]
    )  # fmt: skip
    for name in meter_asgi.__all__:
        assert getattr(meter_asgi, name) is not None


def test_importing_meter_asgi_does_not_import_starlette() -> None:
    code = (
        "import sys, meter_asgi\n"
        "assert 'starlette' not in sys.modules, 'starlette imported'\n"
        "assert 'fastapi' not in sys.modules\n"
        "meter_asgi.meter_usage\n"
        "assert 'starlette' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_meter_usage_without_the_middleware_says_so() -> None:
    from starlette.requests import Request

    request = Request({"type": "http", "headers": [], "method": "GET", "path": "/"})
    with pytest.raises(ConfigurationError, match="add MeterMiddleware"):
        meter_asgi.meter_usage(request)
    request.scope["state"] = {"meter": RequestUsage()}
    assert isinstance(meter_asgi.meter_usage(request), RequestUsage)


@pytest.fixture
def client() -> Any:
    client = MeterClient(transport="memory", device_id="d")
    yield client
    client.close(0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"client": "http://x"}, "client: must be a MeterClient"),
        ({"tenant": 3}, "tenant: must be an id"),
        ({"tenant": "bad\x00id"}, "tenant: 'bad\\\\x00id' is not a valid id"),
        ({"device": ""}, "device:"),
        ({"success_statuses": range(200, 300, 2)}, "success_statuses"),
        ({"success_statuses": [200, 700]}, "success_statuses"),
        ({"success_statuses": "200"}, "success_statuses"),
        ({"allow_unknown_meters": True}, "the client refuses unknown meters"),
        ({"close_timeout": -1}, "close_timeout"),
        ({"routes": {"POST /a": "nope.meter"}}, "unknown meter"),
    ],
)
def test_bad_options_raise_configuration_error(
    client: MeterClient, options: dict[str, Any], message: str
) -> None:
    options.setdefault("client", client)
    with pytest.raises(ConfigurationError, match=message):
        MeterMiddleware(apps.bare_app, **options)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e300])
def test_a_close_timeout_that_no_wait_can_use_is_refused(
    client: MeterClient, timeout: float
) -> None:
    # all were accepted: at lifespan shutdown a nan flush gave up at once (what was
    # queued was not sent), an inf or huge one overflowed the first wait
    with pytest.raises(ConfigurationError) as caught:
        MeterMiddleware(apps.bare_app, client=client, close_timeout=timeout)
    assert str(caught.value) == (
        f"close_timeout: must be a number of seconds from 0 to 86400, got {timeout!r}"
    )
    assert MeterMiddleware(apps.bare_app, client=client, close_timeout=0)._close_timeout == 0


def test_no_device_id_anywhere_is_logged_and_the_app_keeps_serving(
    serve: Callable[..., LiveServer],
    meter_backend: DevServer,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # METER_DEVICE_ID missing on one host: an error at startup, the requests are served
    # and not metered (counted), rather than every request of the app answered 500 (a
    # raise, Starlette building its middleware stack at the first call).
    client = MeterClient(meter_backend.url, internal_url=meter_backend.url, flush_interval=0.05)
    try:
        with caplog.at_level("WARNING", logger="meter.asgi"):
            app = apps.fastapi_app()
            app.add_middleware(MeterMiddleware, client=client, routes=apps.FASTAPI_ROUTES,
                               tenant="acme")  # fmt: skip
            server = serve(app, lifespan="off")
            for _ in range(2):
                assert http.post(server.url + "/documents/d-1/scan").status_code == 200
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "METER_DEVICE_ID" in errors[0].getMessage()
        middleware = app.middleware_stack
        while not isinstance(middleware, MeterMiddleware):
            middleware = middleware.app
        assert middleware.stats["unconfigured"] == 2
        assert client.flush(5) and meter_backend.values() == []
        # a device given to the middleware is enough
        MeterMiddleware(apps.bare_app, client=client, device="web-1")
    finally:
        client.close(0)


def test_from_header_must_be_declared_trusted() -> None:
    with pytest.raises(ConfigurationError, match="forged"):
        MeterMiddleware(apps.bare_app, tenant=from_header("x-tenant-id"))
