"""Fixtures shared by every test package: the real local backend on a loopback port,
and a loopback URL where nothing listens."""

from __future__ import annotations

import socket

import pytest

from meter_core.devserver import DevServer


@pytest.fixture
def backend(meter_backend: DevServer) -> DevServer:
    """The local backend (the ``meter_backend`` fixture meter_core ships), by its short
    name."""
    return meter_backend


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def quick_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender acts on the backend's return after a spell of failures of any length
    (a second in production: not after a blip), so that a test's short outage counts."""
    from meter_core import sender

    monkeypatch.setattr(sender, "_SPELL_WORTH_A_RECOVERY", 0.0)
