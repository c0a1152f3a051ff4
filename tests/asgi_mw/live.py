"""A real uvicorn server in a thread, on a loopback port, for the middleware tests."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn


class LiveServer:
    """Runs ``app`` under ``uvicorn.Server`` in a daemon thread on a socket bound to a free
    loopback port (bound before the server starts, so no other process can take it)."""

    def __init__(self, app: Any, **config: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config.setdefault("log_level", "warning")
        config.setdefault("lifespan", "auto")
        self.server = uvicorn.Server(uvicorn.Config(app, **config))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Graceful shutdown (lifespan shutdown runs), then the socket is closed."""
        self.server.should_exit = True
        self._thread.join(15)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("uvicorn did not stop")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
