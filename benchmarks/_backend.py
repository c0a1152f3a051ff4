"""The benchmarks run the local backend in its own process (so it does not share the GIL
with the code being measured) and drive it through its control API."""

from __future__ import annotations

from meter_core.devserver.remote import RemoteBackend as Backend
from meter_core.devserver.remote import backend_process, free_port

__all__ = ["Backend", "backend_process", "free_port"]
