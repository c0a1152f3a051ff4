"""The package's shape: one-way dependencies, the documented public API, no print."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import meter_core

ROOT = Path(__file__).resolve().parents[2]

DOCUMENTED_API = {
    "CLIENT_OPTIONS", "MAX_USAGE", "METERS", "METHODS_WITHOUT_RESULT", "BackendUnavailable",
    "CapturedEvents", "ClientOption",
    "ConfigurationError", "CustomerNotFound", "DeliveryError", "DeliveryRejected",
    "FailureStore", "HTTPTransport", "InvalidEvent", "LogThrottle", "LogTransport",
    "MemoryFailureStore", "MemoryTransport", "Meter", "MeterClient", "MeterError",
    "MeterSpec", "ProduceResult", "RateLimited", "RecordResult", "RedeliveryReport",
    "RequestUsage", "RetryPolicy", "RouteRules", "SQLiteSpool", "Secret", "StoreError",
    "StoredEvent", "Transport", "UsageEvent", "__version__", "capture_events", "describe_not_due",
    "decode_header_value", "describe_leased",
    "group_reasons",
    "is_known_meter", "now_ms", "post_ai_meter_usage", "post_meter_usage", "redeliver",
    "normalize_template", "parse_usage_header", "register_meter",
    "validate_identifier",
}  # fmt: skip


def test_public_api_is_exactly_the_documented_one() -> None:
    assert set(meter_core.__all__) == DOCUMENTED_API
    for name in meter_core.__all__:
        assert hasattr(meter_core, name), name


def test_importing_meter_core_imports_no_framework() -> None:
    code = (
        "import sys, meter_core, meter_core.testing, meter_core.devserver, meter_core.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'django', 'starlette', 'fastapi', 'uvicorn', 'meter_django', 'meter_asgi'})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""


def test_meter_core_never_imports_the_adapters() -> None:
    for path in (ROOT / "meter_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"django", "starlette", "fastapi"}, path
                assert not name.startswith(("meter_django", "meter_asgi")), path


def test_adapters_use_only_meter_core_public_names() -> None:
    for package in ("meter_django", "meter_asgi"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "meter_core":
                    for alias in node.names:
                        assert alias.name in meter_core.__all__, f"{path}: {alias.name}"
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "meter_core."
                ):
                    raise AssertionError(f"{path} imports private module {node.module}")


def test_library_code_never_prints_nor_configures_logging() -> None:
    allowed = {"cli.py", "__main__.py", "demo.py"}
    for package in ("meter_core", "meter_django", "meter_asgi"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name in allowed or "management" in path.parts:
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    assert node.func.id != "print", f"print() in {path}"
                if isinstance(node, ast.Attribute):
                    assert node.attr != "basicConfig", f"basicConfig in {path}"


def test_every_package_is_typed() -> None:
    for package in ("meter_core", "meter_django", "meter_asgi"):
        assert (ROOT / package / "py.typed").exists(), package
