"""Drive a local backend that runs in another process, through its control API.

Used by the benchmarks and the example demo, which run the backend in its own process
so that it does not share a GIL with the code they measure or show.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["RemoteBackend", "backend_process", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RemoteBackend:
    """The control API of the local backend at ``url`` (``/_records``, ``/_stats``,
    ``/_faults``). Every call raises OSError when the backend does not answer."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"RemoteBackend({self.url!r})"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def stats(self) -> dict[str, Any]:
        """Counters of the backend (records, unique event ids, lookups...)."""
        return dict(self._call("GET", "/_stats"))

    def values(self) -> list[dict[str, Any]]:
        """The record values written so far, in order."""
        return [dict(r["value"]) for r in self._call("GET", "/_records")["records"]]

    def event_ids(self) -> list[str]:
        """The event ids of the records written so far (repeats included)."""
        return [v["event_id"] for v in self.values() if v.get("event_id")]

    def reset(self) -> None:
        """Forget every record and clear any fault."""
        self._call("DELETE", "/_records")
        self._call("DELETE", "/_faults")

    def fault(self, mode: str, **params: Any) -> None:
        """Make the backend misbehave (see :mod:`meter_core.devserver` for the modes)."""
        self._call("POST", "/_faults", {"mode": mode, **params})

    def clear_fault(self) -> None:
        self._call("DELETE", "/_faults")

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Return once the backend answers; raise TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.stats()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no local backend at {self.url}") from exc
                time.sleep(0.05)


@contextmanager
def backend_process(port: int | None = None, host: str = "127.0.0.1") -> Iterator[RemoteBackend]:
    """Run ``python -m meter_core devserver`` in a child process for the ``with`` block."""
    port = port or free_port(host)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meter_core", "devserver", "--host", host, "--port", str(port),
         "--quiet"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    backend = RemoteBackend(f"http://{host}:{port}")
    try:
        backend.wait_ready()
        yield backend
    finally:
        proc.terminate()
        proc.wait(10)
