"""post_meter_usage: this suite vs meter-lib 0.1.0, against the local backend.

Both run the same synchronous loop (one lookup + one produce per call for meter-lib;
pooled connections and the cached lookup for this suite) against one backend process
on loopback, in the same run. Prints events/s side by side.

    .venv/bin/python benchmarks/bench_compat.py [--events N]
"""

from __future__ import annotations

import argparse
import time

import meter_lib
from _backend import backend_process

import meter_core

KEY = "bench-key"


def run(post: object, url: str, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        answer = post(  # type: ignore[operator]
            f"tenant-{i % 10}", "bench", "page.processed.basic", url, 1, url, KEY
        )
        assert answer is not None
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    with backend_process() as backend:
        run(meter_core.post_meter_usage, backend.url, 50)  # warm up both
        run(meter_lib.post_meter_usage, backend.url, 50)
        ours = run(meter_core.post_meter_usage, backend.url, args.events)
        theirs = run(meter_lib.post_meter_usage, backend.url, args.events)
    print(f"post_meter_usage, {args.events} synchronous calls each, local backend on loopback")
    print(f"| {'package':<28} | {'events/s':>9} |")
    print(f"|{'-' * 30}|{'-' * 11}|")
    print(f"| {'meter-lib 0.1.0':<28} | {theirs:>9.0f} |")
    print(f"| {'litewave-meter (meter_core)':<28} | {ours:>9.0f} |")
    print(f"speed-up: {ours / theirs:.1f}x")


if __name__ == "__main__":
    main()
