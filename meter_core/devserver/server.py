"""DevServer: the local metering backend as an object you start and stop."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any

from meter_core.devserver.handler import make_handler
from meter_core.devserver.state import BackendState

__all__ = ["DevServer"]

logger = logging.getLogger("meter.devserver")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-reply (a timeout under test, a killed process) is
        # normal for this server's callers: log it instead of printing a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            logger.debug("client %s went away: %r", client_address, exc)
        else:
            logger.error("error while serving %s", client_address, exc_info=exc)


class DevServer:
    """A real HTTP server on loopback speaking the customer-lookup API (both modes) and
    Kafka REST Proxy v2 produce, for development and tests.

    ``url`` serves as ``kafka_url``, ``portal_url`` and ``internal_url`` at once. Every
    written record is kept (``records``); faults (``set_fault``) make it misbehave the
    ways a real backend does. ``stop()`` then ``start()`` restarts it on the same port
    with its state kept.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        topic: str = "usage-events",
        api_key: str | None = None,
        customers: Mapping[str, str] | None = None,
        auto_customers: bool = True,
        unknown_tenants: Iterable[str] = (),
        lookup_shape: str = "object",
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if lookup_shape not in ("object", "list"):
            raise ValueError(f"lookup_shape must be 'object' or 'list', got {lookup_shape!r}")
        self.host = host
        self._port = port
        self.state = BackendState(
            customers=customers, auto_customers=auto_customers, unknown_tenants=unknown_tenants
        )
        self._handler = make_handler(
            self.state, topic=topic, api_key=api_key, lookup_shape=lookup_shape,
            on_record=on_record,
        )  # fmt: skip
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DevServer:
        """Serve in a daemon thread; returns self. Idempotent."""
        if self._server is None:
            self._server = _Server((self.host, self._port), self._handler)
            self._port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"meter-devserver-{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._thread = None

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._server = _Server((self.host, self._port), self._handler)
        self._port = self._server.server_address[1]
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()
            self._server = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def records(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.records)

    def values(self) -> list[dict[str, Any]]:
        return [r["value"] for r in self.records]

    def event_ids(self) -> list[str]:
        return [v["event_id"] for v in self.values() if "event_id" in v]

    @property
    def lookups(self) -> list[str]:
        with self.state.lock:
            return list(self.state.lookups)

    @property
    def max_concurrent_lookups(self) -> int:
        """The most customer lookups it answered at once (since the last reset)."""
        return self.state.max_concurrent_lookups

    @property
    def produce_requests(self) -> int:
        return self.state.produce_requests

    @property
    def raw_bodies(self) -> list[bytes]:
        with self.state.lock:
            return list(self.state.raw_bodies)

    @property
    def last_headers(self) -> dict[str, str]:
        with self.state.lock:
            return dict(self.state.last_headers)

    def add_customer(self, tenant_id: str, customer_id: str) -> None:
        with self.state.lock:
            self.state.customers[tenant_id] = customer_id
            self.state.unknown_tenants.discard(tenant_id)

    def remove_customer(self, tenant_id: str) -> None:
        with self.state.lock:
            self.state.customers.pop(tenant_id, None)
            self.state.unknown_tenants.add(tenant_id)

    def set_fault(self, mode: str, *, times: int | None = None, **params: Any) -> None:
        """Misbehave: see the package docstring for the modes and their parameters."""
        self.state.set_fault(mode, times, **params)

    def clear_fault(self) -> None:
        self.state.clear_fault()

    def reset(self) -> None:
        """Forget records, lookups, counters and the fault."""
        self.state.reset()
