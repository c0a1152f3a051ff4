"""The ASGI benchmark script keeps working: each variant builds the app it names, and the
in-process table runs. (Its figures are not checked here: they live in the README.)"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_asgi", BENCHMARKS / "bench_asgi.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(
    ("variant", "middleware"),
    [
        ("baseline", None),
        ("floor", "StatusObserver"),
        ("meter", "MeterMiddleware"),
        ("meter-nodelivery", "MeterMiddleware"),
        ("meter-idle", "MeterMiddleware"),
        ("moesif", "MoesifMiddleware"),
    ],
)
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_each_variant_installs_the_middleware_it_names(
    bench: ModuleType, variant: str, middleware: str | None, framework: str
) -> None:
    app = bench.build_app(variant, "http://127.0.0.1:9", framework)
    installed = [m.cls.__name__ for m in app.user_middleware]
    assert installed == ([] if middleware is None else [middleware])


def test_the_in_process_table_measures_every_variant(bench: ModuleType) -> None:
    costs = bench.in_process_costs(calls=20, repeats=1)
    assert list(costs) == [
        "baseline",
        "idle",
        "metered, client disabled",
        "metered, memory transport",
    ]
    assert all(0 < micros < 10_000 for micros in costs.values())


def test_the_endpoint_work_is_cpu_time_of_the_thread(bench: ModuleType) -> None:
    started = time.thread_time()
    bench.burn_cpu(3000)
    assert time.thread_time() - started >= 0.003
