"""New tenants billed per second when the customer lookup API is some way off.

After a restart the customer cache is empty, and its answers expire after 5 minutes:
every active tenant is looked up again. The local backend (a real HTTP server on a
loopback port, in its own process) answers each lookup and produce request after
each ``--latency`` (ms); one
delivery attempt sends one event of each of ``--tenants`` new tenants, with the
transport allowing one lookup at a time (``pool_maxsize=2``, as before lookups ran
together) and then its default (``pool_maxsize=10``: 5 at a time).

    .venv/bin/python benchmarks/bench_lookups.py [--tenants 200] [--latency 0,2,20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code

from _backend import Backend, backend_process

from meter_core import HTTPTransport, UsageEvent
from meter_core.customers import CustomerCache
from meter_core.delivery import deliver_once


def run(backend: Backend, pool_maxsize: int, tenants: int, tag: object) -> tuple[int, float]:
    """(lookups at once, new tenants delivered per second) for one attempt."""
    transport = HTTPTransport(backend.url, internal_url=backend.url, pool_maxsize=pool_maxsize)
    events = [
        UsageEvent(f"{tag}-{pool_maxsize}-tenant-{n}", "bench", "page.processed.basic", 1)
        for n in range(tenants)
    ]
    started = time.perf_counter()
    outcome = deliver_once(
        events, lambda e: e, transport=transport,
        customers=CustomerCache(transport.lookup_customer), max_batch_bytes=1 << 20,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    transport.close()
    if len(outcome.delivered) != tenants:
        raise SystemExit(f"only {len(outcome.delivered)} of {tenants} events delivered")
    return transport.lookup_concurrency, tenants / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=200, help="new tenants per attempt")
    parser.add_argument("--latency", default="0,2,20", help="ms per backend answer, a list")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    latencies = [float(ms) for ms in args.latency.split(",")]
    print(f"{args.tenants} new tenants in one attempt, best of {args.rounds} rounds")
    print("| ms per answer | lookups at once | new tenants/s |")
    print("|---|---|---|")
    with backend_process() as backend:
        for latency in latencies:
            backend.fault("slow", delay=latency / 1000)
            rates: dict[int, list[float]] = {}
            at_once: dict[int, int] = {}
            for round_no in range(args.rounds):
                for pool in (2, 10):
                    tag = f"{latency:g}ms-r{round_no}"
                    at_once[pool], rate = run(backend, pool, args.tenants, tag)
                    rates.setdefault(pool, []).append(rate)
            for pool, found in rates.items():
                print(f"| {latency:g} | {at_once[pool]} | {max(found):,.0f} |")


if __name__ == "__main__":
    main()
