"""Cost of a new tenant in the customer-id cache, as it fills up.

The sender looks up each tenant it has no answer for, and a full cache drops its oldest
answer to make room. Measured in-process with an instant lookup (no network): the cost
of the cache itself per new tenant, by how full it is. A full cache must cost no more
than an empty one: every new tenant goes through it, so a cost that grows with the
cache caps how many new tenants per second the client can bill.

    .venv/bin/python benchmarks/bench_customer_cache.py [--max-entries 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code

from meter_core.customers import CustomerCache


def cost_per_new_tenant(cache: CustomerCache, first: int, count: int) -> float:
    """µs per lookup of ``count`` tenants the cache has never seen."""
    started = time.perf_counter()
    for i in range(first, first + count):
        cache.get(f"tenant-{i}")
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-entries", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=5_000, help="new tenants per row")
    args = parser.parse_args()
    cache = CustomerCache(lambda tenant: f"cust-{tenant}", max_entries=args.max_entries)
    print(f"| cache filled to | µs per new tenant (max_entries {args.max_entries:,}) |")
    print("|---|---|")
    seen = 0
    for fill in (0.0, 0.5, 0.99, 1.0, 1.0):
        target = int(args.max_entries * fill)
        for i in range(seen, max(seen, target)):
            cache.get(f"tenant-{i}")
        seen = max(seen, target)
        label = "full, evicting" if fill == 1.0 else f"{fill:.0%}"
        print(f"| {label} | {cost_per_new_tenant(cache, seen, args.sample):.1f} |")
        seen += args.sample


if __name__ == "__main__":
    main()
