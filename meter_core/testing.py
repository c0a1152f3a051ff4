"""Test helpers for code that records usage (a pytest plugin, loaded automatically).

- ``meter_backend`` fixture: a running :class:`~meter_core.devserver.DevServer` on a free
  loopback port, stopped after the test. Point a client at ``meter_backend.url``.
- ``meter_client`` fixture: a :class:`~meter_core.MeterClient` on that backend with a fast
  flush interval, closed after the test.
- :func:`capture_events`: a context manager collecting every event recorded in the
  process while it is open, whatever the transport (like Django's ``mail.outbox``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meter_core.capture import CapturedEvents, capture_events
from meter_core.client import MeterClient
from meter_core.devserver import DevServer

__all__ = ["CapturedEvents", "capture_events", "meter_backend", "meter_client"]


@pytest.fixture
def meter_backend() -> Iterator[DevServer]:
    """A local metering backend (customer lookup + REST Proxy) on a loopback port."""
    server = DevServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def meter_client(meter_backend: DevServer) -> Iterator[MeterClient]:
    """A client of ``meter_backend`` (internal lookup mode, device ``test-device``)."""
    client = MeterClient(
        meter_backend.url,
        internal_url=meter_backend.url,
        device_id="test-device",
        flush_interval=0.05,
        timeout=5.0,
    )
    try:
        yield client
    finally:
        client.close(timeout=5.0)
