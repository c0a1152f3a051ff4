"""The public surface of meter_asgi and its option checking."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import meter_asgi
from meter_asgi import MeterMiddleware, from_header
from meter_core import ConfigurationError, MeterClient, RequestUsage
from tests.asgi_mw import apps


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


def test_a_device_id_is_required_somewhere() -> None:
    client = MeterClient(transport="memory")
    try:
        with pytest.raises(ConfigurationError, match="no device id"):
            MeterMiddleware(apps.bare_app, client=client)
        MeterMiddleware(apps.bare_app, client=client, device="web-1")
    finally:
        client.close(0)


def test_from_header_must_be_declared_trusted() -> None:
    with pytest.raises(ConfigurationError, match="forged"):
        MeterMiddleware(apps.bare_app, tenant=from_header("x-tenant-id"))
