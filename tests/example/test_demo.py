"""The README's first command must keep working: run the end-to-end demo as a newcomer
would (its own processes, loopback ports, SQLite) and check its verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_and_finds_every_event_exactly_once() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "example_project" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK: nothing lost, nothing billed twice" in out.stdout
    assert "received more than once: 0" in out.stdout
    assert "every process started here is stopped" in out.stdout
