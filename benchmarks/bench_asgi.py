"""Overhead of MeterMiddleware under load, against no middleware and against moesifasgi.

The same trivial app (a Starlette route, or with ``--framework fastapi`` the same endpoint
as a FastAPI path operation) runs under uvicorn in a subprocess, one variant at a time.
``--work-us N`` makes the endpoint spend N µs of CPU per request first (an endpoint that
does some work, against the trivial one); ``--batch-size N`` sets the meter client's
``batch_size`` (events per produce request). The variants:

  baseline   no middleware
  floor      a pure ASGI middleware that only reads the response status (StatusObserver
             below): the least any middleware metering by status can cost
  meter      MeterMiddleware on the metered route, recording into the local backend
             (its own process, see _backend.py); every request becomes one event
  meter-nodelivery  the same, with a disabled client: each event is built and validated,
             then discarded (the middleware's own cost, without the delivery work)
  meter-idle MeterMiddleware installed, but the route driven is not metered (its only
             rule is for another method: the cost of the pass-through path alone)
  moesif     moesifasgi's MoesifMiddleware (the nearest public peer), sending to a
             closed loopback port

A load generator (``wrk`` when on PATH, else the keep-alive asyncio one below, in its own
process) drives each for the same time. The app server gets a CPU of its own (the load
generator and the local backend share the other). Each round runs every variant once;
losses are medians over the rounds of each variant against the baseline of its own round,
both by requests/s and by the server's CPU time per request (the steadier figure on a
shared machine). A table of in-process costs per request (no server) follows.

    .venv/bin/python benchmarks/bench_asgi.py [--duration 10] [--connections 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The in-process table imports the packages here: measure this checkout's code, not
# whichever copy is installed in the environment.
sys.path.insert(0, str(ROOT))

from _backend import backend_process, free_port  # noqa: E402

PATH = "/documents/42/scan"
SERVER_CPU = 0
VARIANTS = ("baseline", "floor", "meter", "meter-nodelivery", "meter-idle", "moesif")


class StatusObserver:
    """The least a metering middleware must do: a pure ASGI wrapper that reads the
    response status from ``send``. No route lookup, no event: the reference for the
    cost of any middleware of this kind (variant ``floor``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.statuses = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def observe(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, observe)
        if 200 <= status < 300:
            self.statuses += 1


# -- the server (child process) --------------------------------------------------------


def burn_cpu(micros: float) -> None:
    """Spend ``micros`` µs of this thread's CPU time (not wall time: time spent waiting
    for the GIL, while another thread runs, does not count)."""
    if micros <= 0:
        return
    clock = time.thread_time
    end = clock() + micros / 1e6
    while clock() < end:
        pass


def build_app(
    variant: str,
    backend_url: str,
    framework: str = "starlette",
    work_us: float = 0.0,
    batch_size: int | None = None,
    flush_interval: float | None = None,
) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    app: Any
    if framework == "fastapi":
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/documents/{doc_id}/scan", response_class=PlainTextResponse)
        async def scan_doc(doc_id: int) -> str:
            burn_cpu(work_us)
            return "scanned"

    else:

        async def scan(request: Request) -> PlainTextResponse:
            burn_cpu(work_us)
            return PlainTextResponse("scanned")

        app = Starlette(routes=[Route("/documents/{doc_id}/scan", scan)])
    if variant.startswith("meter"):
        from meter_asgi import MeterMiddleware
        from meter_core import MeterClient

        # nodelivery: every event is built and validated, then discarded (enabled=False),
        # which separates the middleware's own cost from the client's delivery work.
        client = MeterClient(
            backend_url, internal_url=backend_url, device_id="bench",
            enabled=variant != "meter-nodelivery",
            **({"batch_size": batch_size} if batch_size else {}),
            **({"flush_interval": flush_interval} if flush_interval else {}),
        )  # fmt: skip
        # meter-idle: the rule is for another method of the route, so requests are not metered
        method = "POST" if variant == "meter-idle" else "GET"
        metered = f"{method} /documents/{{doc_id}}/scan"
        app.add_middleware(
            MeterMiddleware,
            client=client,
            routes={metered: "page.processed.basic"},
            tenant="bench-tenant",
        )
    elif variant == "floor":
        app.add_middleware(StatusObserver)
    elif variant == "moesif":
        from moesifasgi import MoesifMiddleware

        settings = {"APPLICATION_ID": "bench", "BASE_URI": backend_url, "LOG_BODY": True}
        app.add_middleware(MoesifMiddleware, settings=settings)
    return app


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run(
        build_app(
            args.serve,
            args.backend,
            args.framework,
            args.work_us,
            args.batch_size,
            args.flush_interval,
        ),
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        access_log=False,
        lifespan="on",
    )


# -- the load generator (child process) ------------------------------------------------


async def _connection(
    port: int, stop_at: float, warm_until: float, latencies: list[float]
) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    done = errors = 0
    clock = time.perf_counter
    try:
        while True:
            started = clock()
            if started >= stop_at:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if match:
                await reader.readexactly(int(match.group(1)))
            if started < warm_until:
                continue
            if head.startswith(b"HTTP/1.1 200"):
                done += 1
                latencies.append(clock() - started)
            else:
                errors += 1
    finally:
        writer.close()
        await writer.wait_closed()
    return done, errors


async def _load(port: int, duration: float, connections: int, warmup: float) -> dict[str, Any]:
    latencies: list[float] = []
    now = time.perf_counter()
    warm_until = now + warmup
    stop_at = warm_until + duration
    results = await asyncio.gather(
        *(_connection(port, stop_at, warm_until, latencies) for _ in range(connections))
    )
    latencies.sort()
    done = sum(r[0] for r in results)
    return {
        "rps": done / duration,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan"),
        "errors": sum(r[1] for r in results),
    }


def run_wrk(port: int, duration: float, connections: int) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", f"-t{min(4, connections)}", f"-c{connections}", f"-d{int(duration)}s",
         "--latency", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def ms(label: str) -> float:
        found = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        if not found:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
        return float(found.group(1)) * scale

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "errors": 0}  # fmt: skip


# -- in-process cost per request (no network, no load generator: stable on a busy box) --


def in_process_costs(calls: int = 5000, repeats: int = 10) -> dict[str, float]:
    """Microseconds per request of the app called directly (best of ``repeats``)."""
    from meter_asgi import MeterMiddleware
    from meter_core import MeterClient

    clients: list[MeterClient] = []

    def app_for(variant: str) -> Any:
        app = build_app("baseline", "")
        if variant != "baseline":
            client = MeterClient(transport="memory", device_id="bench",
                                 enabled=variant != "metered, client disabled")  # fmt: skip
            clients.append(client)
            method = "POST" if variant == "idle" else "GET"  # idle: another method's rule
            route = f"{method} /documents/{{doc_id}}/scan"
            app.add_middleware(
                MeterMiddleware, client=client, routes={route: "page.processed.basic"},
                tenant="bench-tenant",
            )  # fmt: skip
        return app

    scope = {"type": "http", "method": "GET", "path": PATH, "raw_path": PATH.encode(),
             "root_path": "", "headers": [(b"host", b"x")], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1),
             "client": ("127.0.0.1", 2), "asgi": {"version": "3.0"}}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def per_call(app: Any) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await app(dict(scope), receive, send)
        return (time.perf_counter() - started) / calls * 1e6

    variants = ("baseline", "idle", "metered, client disabled", "metered, memory transport")
    apps = {v: app_for(v) for v in variants}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for variant, app in apps.items():
            best[variant] = min(best[variant], asyncio.run(per_call(app)))
    for client in clients:
        client.close(5)  # (delivers to memory: nothing left over to report)
    return best


# -- the driver ------------------------------------------------------------------------


def wait_until_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sender_cpu_seconds(pid: int) -> float:
    """CPU time used so far by the process's threads other than the main one (the event
    loop's): in the meter variants, the meter sender thread."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(variant: str, args: argparse.Namespace, backend_url: str) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"}
    me = str(Path(__file__).resolve())
    server = subprocess.Popen(
        [
            sys.executable,
            me,
            "--serve",
            variant,
            "--port",
            str(port),
            "--backend",
            backend_url,
            "--framework",
            args.framework,
            "--work-us",
            str(args.work_us),
            *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        ],
        env=env,
        preexec_fn=(lambda: os.sched_setaffinity(0, {SERVER_CPU})) if args.pin else None,
        # moesifasgi configures the root logger and logs every failed send: keep it quiet
        stderr=subprocess.DEVNULL if variant == "moesif" else None,
    )
    try:
        wait_until_serving(port, server)
        if shutil.which("wrk") and not args.no_wrk:
            subprocess.run(
                ["wrk", "-t1", "-c4", f"-d{max(1, int(args.warmup))}s",
                 f"http://127.0.0.1:{port}{PATH}"],
                capture_output=True, check=True,
            )  # fmt: skip
            cpu_before = cpu_seconds(server.pid)
            sender_before = sender_cpu_seconds(server.pid)
            result = run_wrk(port, args.duration, args.connections)
        else:
            cpu_before = cpu_seconds(server.pid)
            sender_before = sender_cpu_seconds(server.pid)
            load = subprocess.run(
                [sys.executable, me, "--load", "--port", str(port), "--duration",
                 str(args.duration), "--connections", str(args.connections), "--warmup", "0"],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = dict(json.loads(load.stdout))
        requests_served = result["rps"] * args.duration
        cpu = cpu_seconds(server.pid) - cpu_before
        sender = sender_cpu_seconds(server.pid) - sender_before
        result["cpu_us"] = cpu / requests_served * 1e6 if requests_served else float("nan")
        result["sender_us"] = sender / requests_served * 1e6 if requests_served else float("nan")
        return result
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each runs every variant)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--no-wrk", action="store_true", help="use the asyncio generator")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give the app server a CPU of its own",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset to run"
    )
    parser.add_argument("--costs-only", action="store_true", help="only the in-process table")
    parser.add_argument(
        "--framework",
        choices=("starlette", "fastapi"),
        default="starlette",
        help="the app: a Starlette route, or the same endpoint as a FastAPI path operation",
    )
    parser.add_argument(
        "--work-us",
        type=float,
        default=0.0,
        help="µs of CPU the endpoint spends per request (default 0: the trivial endpoint)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="the meter client's batch_size (default: the client's default, 500)",
    )
    parser.add_argument("--flush-interval", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args)
        return
    if args.load:
        print(json.dumps(asyncio.run(_load(args.port, args.duration, args.connections,
                                           args.warmup))))  # fmt: skip
        return

    if args.costs_only:
        for variant, micros in in_process_costs().items():
            print(f"  {variant:<27} {micros:6.1f} us")
        return
    generator = "wrk" if shutil.which("wrk") and not args.no_wrk else "asyncio keep-alive"
    args.pin = args.pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1
    if args.pin:
        # The app server gets one CPU to itself; the load generator and the local backend
        # share the others. Then what the backend (which in production runs elsewhere)
        # costs does not count against the app, and each variant's server has the same CPU.
        os.sched_setaffinity(0, os.sched_getaffinity(0) - {SERVER_CPU})
        print(f"app server pinned to CPU {SERVER_CPU}; load generator and backend on the others")
    print(
        f"{args.duration:g}s per run, {args.connections} connections, {args.rounds} round(s), "
        f"load generator: {generator}, {os.cpu_count()} CPUs, app: {args.framework}"
        + (f", endpoint work {args.work_us:g} µs CPU" if args.work_us else "")
        + (f", batch_size {args.batch_size}" if args.batch_size else "")
    )
    chosen = [v for v in VARIANTS if v in args.variants.split(",")]
    if "baseline" not in chosen:
        chosen.insert(0, "baseline")
    best: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    with backend_process() as backend:
        closed = f"http://127.0.0.1:{free_port()}"
        for round_ in range(args.rounds):
            for variant in chosen:
                url = closed if variant == "moesif" else backend.url
                result = measure(variant, args, url)
                print(
                    f"  round {round_ + 1} {variant:<17} {result['rps']:9.0f} req/s "
                    f"{result['cpu_us']:7.1f} CPU us/req "
                    f"(sender thread {result['sender_us']:.1f})",
                    flush=True,
                )
                runs.setdefault(variant, []).append(result)
                if variant not in best or result["rps"] > best[variant]["rps"]:
                    best[variant] = result
        events = backend.stats()["records"]

    # Each round runs every variant once, back to back: a variant is compared with the
    # baseline of its own round, and the median of those paired ratios is reported, so a
    # machine that is faster in one round than in another does not bias the figures.
    def median_loss(variant: str, loss: Callable[[dict[str, Any], dict[str, Any]], float]) -> float:
        pairs = zip(runs["baseline"], runs[variant], strict=True)
        return statistics.median(loss(base, run) for base, run in pairs) * 100

    print()
    print("req/s, p50, p99: the variant's best round. loss: median over the rounds of")
    print("1 - variant req/s / baseline req/s of the same round. CPU us/req: the app server's")
    print("CPU time (all threads, the meter sender's included) per request served, median;")
    print("loss by CPU: median of 1 - baseline CPU / variant CPU in the same round, the")
    print("steadier figure on a shared machine (a CPU-bound server's throughput loss).")
    print("sender: the part of CPU us/req spent off the event loop's thread (in the meter")
    print("variants, by the meter sender thread: delivery).")
    print()
    print(f"{'variant':<17} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'loss':>7} "
          f"{'CPU us/req':>11} {'sender':>7} {'loss by CPU':>12}")  # fmt: skip
    for variant in chosen:
        r = best[variant]
        cpu = statistics.median(run["cpu_us"] for run in runs[variant])
        sender = statistics.median(run["sender_us"] for run in runs[variant])
        first = variant == "baseline"
        loss = median_loss(variant, lambda base, run: 1 - run["rps"] / base["rps"])
        cpu_loss = median_loss(variant, lambda base, run: 1 - base["cpu_us"] / run["cpu_us"])
        print(
            f"{variant:<17} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{'-' if first else f'{loss:.1f} %':>7} {cpu:11.1f} {sender:7.1f} "
            f"{'-' if first else f'{cpu_loss:.1f} %':>12}"
        )
    print(f"\nevents the local backend received from the meter variant: {events}")
    print("\nin-process cost per request (app called directly, best of 10 runs):")
    costs = in_process_costs()
    for variant, micros in costs.items():
        extra = micros - costs["baseline"]
        print(f"  {variant:<27} {micros:6.1f} us  (+{extra:.1f} us)")


if __name__ == "__main__":
    main()
