"""Machine instructions per request of MeterMiddleware under uvicorn, counted by
valgrind's callgrind: a figure that moves far less than requests/s with what else the
machine is doing (it still moves a little with timing: how many requests the event loop
takes at each wake-up).

``bench_asgi.py`` measures requests/s and CPU time, which a shared machine's noise moves
by several percent from one round to the next. This script counts the instructions the
app server executes (user space, all its threads: the meter sender's included) while it
serves a fixed number of requests, for each variant of ``bench_asgi.py``'s trivial app.
The loss by instructions is ``1 - baseline / variant``: the throughput loss of a
CPU-bound server whose extra instructions run as fast as the rest of it. (Under load they
run slower, out of the CPU's caches, so requests/s figures are higher, and more so on a
busy machine: read the two together.)

How: the server runs under callgrind with its instrumentation off. Warm-up requests fill
its caches (imports, route rules, the customer lookup) and, in the ``meter`` variant, two
full batches are delivered to the local backend. Then counting is turned on
(``callgrind_control -i on``), ``--requests`` requests are sent over 4 keep-alive
connections, the ``meter`` variant's sender delivers their events, and counting stops.
The client's flush interval is 60 s, so its batches are full (500 events), as under load,
rather than as small as a server slowed down by valgrind would make them.

    .venv/bin/python benchmarks/bench_asgi_instructions.py [--requests 2000] [--variants ...]

Needs valgrind (``callgrind_control`` comes with it); about a minute per variant.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _backend import Backend, backend_process, free_port
from bench_asgi import PATH, ROOT, VARIANTS, wait_until_serving

BENCH = Path(__file__).resolve().with_name("bench_asgi.py")
BATCH = 500  # the meter client's default batch_size
WARMUP = 2 * BATCH
CONNECTIONS = 4
SENT_VARIANT = "meter"  # the variant whose events reach the backend


async def _connection(port: int, count: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    ok = 0
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            ok += head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
        await writer.wait_closed()
    return ok


def send_requests(port: int, total: int) -> None:
    """Send ``total`` requests over keep-alive connections; all must succeed."""

    async def run() -> int:
        share = [total // CONNECTIONS + (i < total % CONNECTIONS) for i in range(CONNECTIONS)]
        return sum(await asyncio.gather(*(_connection(port, n) for n in share)))

    ok = asyncio.run(run())
    if ok != total:
        raise RuntimeError(f"{total - ok} of {total} requests did not answer 200")


def wait_for_records(backend: Backend, expected: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while backend.stats()["records"] < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backend did not get {expected} records")
        time.sleep(0.5)


def thread_totals(outdir: str) -> list[int]:
    """Instructions counted per thread (the main thread, the event loop's, first)."""
    totals: list[tuple[str, int]] = []
    for path in sorted(Path(outdir).iterdir()):
        found = re.search(r"^totals:\s*(\d+)", path.read_text(errors="replace"), re.M)
        if found:
            totals.append((path.name, int(found.group(1))))
    return [count for _, count in sorted(totals)]


def count(variant: str, backend: Backend, requests: int, control: str) -> list[int]:
    """Instructions per thread of the server while it serves ``requests`` requests."""
    port = free_port()
    outdir = tempfile.mkdtemp(prefix="callgrind-")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{BENCH.parent}",
           "PYTHONHASHSEED": "0"}  # fmt: skip
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
         f"--callgrind-out-file={outdir}/callgrind.out.%p", sys.executable, str(BENCH),
         "--serve", variant, "--port", str(port), "--backend", backend.url,
         "--flush-interval", "60"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_serving(port, server, timeout=600)
        records = backend.stats()["records"]
        send_requests(port, WARMUP)
        if variant == SENT_VARIANT:
            records += WARMUP
            wait_for_records(backend, records)
        subprocess.run([control, "-i", "on", str(server.pid)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        send_requests(port, requests)
        if variant == SENT_VARIANT:
            wait_for_records(backend, records + requests)
        subprocess.run([control, "-i", "off", str(server.pid)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    finally:
        server.terminate()
        server.wait(120)
    totals = thread_totals(outdir)
    shutil.rmtree(outdir, ignore_errors=True)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4 * BATCH,
                        help="requests counted per variant (a multiple of 500)")  # fmt: skip
    default = ",".join(v for v in VARIANTS if v != "moesif")
    parser.add_argument("--variants", default=default, help="comma-separated subset to run")
    args = parser.parse_args()
    control = shutil.which("callgrind_control")
    if control is None or shutil.which("valgrind") is None:
        sys.exit("this benchmark needs valgrind (callgrind_control comes with it) on PATH")
    if args.requests <= 0 or args.requests % BATCH:
        sys.exit(f"--requests: a positive multiple of {BATCH} (full batches), got {args.requests}")
    chosen = [v for v in VARIANTS if v in args.variants.split(",")]
    if "baseline" not in chosen:
        chosen.insert(0, "baseline")
    print(f"{args.requests} requests counted per variant, after {WARMUP} to warm up")
    per_request: dict[str, float] = {}
    off_loop: dict[str, float] = {}
    with backend_process() as backend:
        for variant in chosen:
            totals = count(variant, backend, args.requests, control)
            per_request[variant] = sum(totals) / args.requests
            off_loop[variant] = sum(totals[1:]) / args.requests
            print(f"  {variant:<17} {per_request[variant]:10,.0f} instructions/request",
                  flush=True)  # fmt: skip
    base = per_request["baseline"]
    print()
    print("instructions/request: all the server's threads, user space. extra: against the")
    print("baseline. off the loop: the part run by other threads than the event loop's (in")
    print("the meter variant, the sender: delivery). loss: 1 - baseline / variant.")
    print()
    print(f"{'variant':<17} {'instr/request':>14} {'extra':>9} {'off the loop':>13} {'loss':>7}")
    for variant in chosen:
        total = per_request[variant]
        first = variant == "baseline"
        extra = "-" if first else f"{total - base:+,.0f}"
        loss = "-" if first else f"{(1 - base / total) * 100:.1f} %"
        print(f"{variant:<17} {total:14,.0f} {extra:>9} {off_loop[variant]:13,.0f} {loss:>7}")


if __name__ == "__main__":
    main()
