"""How long an event loop waits for the GIL while the meter sender encodes batches.

An asyncio loop (the app's) wakes every millisecond and measures how late it woke, while
a thread runs what the sender runs for every batch: ``deliver_once`` over 500 events
into an in-memory transport, then a pause of 5 ms, over and over. The sender releases the
GIL for a moment every so many events; the variants set how often, and how:

  no sender              the loop alone
  every 256, sleep(0)    how the sender released it before (``time.sleep(0)``)
  every 64, sleep(0)
  every 64, sched_yield  what it does now (``os.sched_yield()``)

For each: the loop's wake-up delay (p50, p99, max) and the sender's own CPU per event
(``time.thread_time``). Run pinned to one CPU (the app server's situation in
bench_asgi.py) and on all of them; rounds interleave the variants, figures are medians.

    .venv/bin/python benchmarks/bench_loop_lag.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout's code

import meter_core.delivery as delivery  # noqa: E402
from meter_core import MeterClient, UsageEvent  # noqa: E402
from meter_core.sender import _event_of, _Item  # noqa: E402
from meter_core.transport import MemoryTransport  # noqa: E402


def _sleep0() -> None:
    time.sleep(0)


VARIANTS: dict[str, tuple[int, Callable[[], None]] | None] = {
    "no sender": None,
    "every 256, sleep(0)": (255, _sleep0),
    "every 64, sleep(0)": (63, _sleep0),
    "every 64, sched_yield": (63, getattr(os, "sched_yield", _sleep0)),
}


def run(variant: str, seconds: float) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, max ms, sender µs/event) of one variant."""
    setting = VARIANTS[variant]
    stop = threading.Event()
    per_event: list[float] = []
    if setting is not None:
        delivery._YIELD_MASK, delivery._release_gil = setting
        client = MeterClient(transport="memory", device_id="bench")
        items = [_Item(UsageEvent("acme", "bench", "page.processed.basic", i)) for i in range(500)]
        transport = MemoryTransport()

        def sender() -> None:
            while not stop.is_set():
                started = time.thread_time()
                delivery.deliver_once(
                    items, _event_of, transport=transport, customers=client._customers,
                    max_batch_bytes=1 << 20,
                )  # fmt: skip
                per_event.append((time.thread_time() - started) / len(items) * 1e6)
                transport.records.clear()
                time.sleep(0.005)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()

    async def loop() -> list[float]:
        lags: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            await asyncio.sleep(0.001)
            lags.append(time.monotonic() - started - 0.001)
        return lags

    lags = sorted(asyncio.run(loop()))
    stop.set()
    if setting is not None:
        thread.join(2)
        client.close(0)
    cpu = statistics.median(per_event) if per_event else float("nan")
    return (lags[len(lags) // 2] * 1e3, lags[int(len(lags) * 0.99)] * 1e3, lags[-1] * 1e3, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per variant")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every variant)")
    args = parser.parse_args()
    saved = delivery._YIELD_MASK, delivery._release_gil
    all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    settings = [("one CPU", {min(all_cpus)})] if all_cpus and len(all_cpus) > 1 else []
    settings.append(("all CPUs", all_cpus or set()))
    print(f"{args.rounds} round(s) of {args.seconds:g} s per variant; figures are medians")
    print(f"{'CPUs':<9} {'variant':<22} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'sender µs/event':>16}")  # fmt: skip
    for label, cpus in settings:
        if cpus:
            os.sched_setaffinity(0, cpus)
        results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                results[variant].append(run(variant, args.seconds))
        for variant, rows in results.items():
            p50, p99, worst, cpu = (statistics.median(column) for column in zip(*rows, strict=True))
            print(f"{label:<9} {variant:<22} {p50:7.2f} {p99:7.2f} {worst:7.2f} {cpu:16.2f}")
    delivery._YIELD_MASK, delivery._release_gil = saved


if __name__ == "__main__":
    main()
