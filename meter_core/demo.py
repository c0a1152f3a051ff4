"""``python -m meter_core demo``: meter_core end to end against an in-process local backend.

It records usage for a few tenants, shows what the backend received, takes the backend
down while usage keeps coming, shows the undelivered events in a SQLite spool, resends
them once the backend is back, and checks that every event id arrived exactly once.
"""

from __future__ import annotations

import collections
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from meter_core.client import MeterClient
from meter_core.devserver import DevServer
from meter_core.redeliver import redeliver
from meter_core.spool import SQLiteSpool

__all__ = ["run_demo"]

TENANTS = ("acme", "globex", "initech")
METERS = ("page.processed.basic", "report.generated.small", "chat.query.time_secs")


def _table(values: list[dict[str, object]], out: Callable[[str], object]) -> None:
    usage: collections.Counter[tuple[str, str]] = collections.Counter()
    for value in values:
        usage[(str(value.get("tenant_id")), str(value.get("meter_id")))] += int(
            value.get("total_usage", 0)  # type: ignore[call-overload]
        )
    out(f"    {'tenant':<10} {'meter':<26} {'usage':>6}")
    for (tenant, meter), total in sorted(usage.items()):
        out(f"    {tenant:<10} {meter:<26} {total:>6}")


def run_demo(out: Callable[[str], object]) -> int:
    """Run the tour, writing each line with ``out`` (the command passes ``print``); returns
    0 when every event arrived exactly once."""
    with tempfile.TemporaryDirectory() as tmp, DevServer() as backend:
        spool = SQLiteSpool(Path(tmp) / "meter-spool.db")
        client = MeterClient(
            backend.url,
            internal_url=backend.url,
            device_id="demo-host",
            failure_store=spool,
            flush_interval=0.05,
            max_retries=2,
            backoff_base=0.05,
            backoff_cap=0.2,
            timeout=2.0,
        )
        out(f"1. local backend on {backend.url}; recording usage for {len(TENANTS)} tenants")
        accepted: list[str] = []
        for i in range(30):
            accepted.append(
                client.record(
                    tenant_id=TENANTS[i % 3],
                    meter_id=METERS[i % len(METERS)],
                    total_usage=1 + i % 4,
                )
            )
        client.flush(10)
        out(f"   the backend holds {len(backend.records)} records:")
        _table(backend.values(), out)

        out("2. the backend goes down; usage keeps coming (record() never waits)")
        backend.set_fault("down")
        started = time.perf_counter()
        for i in range(20):
            accepted.append(
                client.record(tenant_id=TENANTS[i % 3], meter_id=METERS[0], total_usage=1)
            )
        took_ms = (time.perf_counter() - started) * 1000
        out(f"   20 record() calls took {took_ms:.2f} ms in all")
        client.flush(10)
        counts = spool.counts()["by_reason"]
        out("   undelivered events, kept in the SQLite spool:")
        for reason, n in counts.items():
            out(f"    {n:>4}  {reason[:100]}")

        out("3. the backend is back; `meter retry --spool ...` resends the stored events")
        backend.clear_fault()
        report = redeliver(spool, client)
        out(f"   {report.summary()}")
        client.close()

        ids = backend.event_ids()
        counted = collections.Counter(ids)
        missing = set(accepted) - set(counted)
        duplicated = [i for i, n in counted.items() if n > 1]
        out(
            f"4. check: {len(accepted)} events accepted, {len(set(ids))} distinct event ids "
            f"received, {len(missing)} missing, {len(duplicated)} duplicated"
        )
        ok = not missing and not duplicated
        out("   every event arrived exactly once" if ok else "   CHECK FAILED")
        out("next: README.md (quickstarts), `meter devserver`, `meter spool --spool PATH`")
        return 0 if ok else 1
