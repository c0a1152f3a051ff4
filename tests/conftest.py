"""Fixtures shared by every test package: the real local backend on a loopback port,
and a loopback URL where nothing listens."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from meter_core.devserver import DevServer


@pytest.fixture
def backend() -> Iterator[DevServer]:
    server = DevServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
