"""Start the local backend in its own process (so it does not share the GIL with the
code being measured) and talk to its control API."""

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Backend:
    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_stats"))

    def event_ids(self) -> list[str]:
        records = self._call("GET", "/_records")["records"]
        return [r["value"].get("event_id") for r in records if r["value"].get("event_id")]

    def reset(self) -> None:
        self._call("DELETE", "/_records")
        self._call("DELETE", "/_faults")

    def fault(self, mode: str, **params: Any) -> None:
        self._call("POST", "/_faults", {"mode": mode, **params})

    def clear_fault(self) -> None:
        self._call("DELETE", "/_faults")


@contextmanager
def backend_process() -> Iterator[Backend]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meter_core", "devserver", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
    )
    backend = Backend(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                backend.stats()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield backend
    finally:
        proc.terminate()
        proc.wait(10)
