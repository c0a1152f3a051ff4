"""A whole-request deadline for the HTTP transport.

``requests`` (and urllib3 under it) bound each wait on the socket, not a request: a
backend or gateway that drips its answer a byte at a time, each within the timeout,
holds the caller for as long as it likes. For the sender that means every event of the
process waits, with no line in the log. So each request of the transport is armed with a
deadline: one watchdog thread per process shuts the socket of a request that outlives
it, which ends the blocked read at once with a connection error.

How: :class:`DeadlineAdapter` (a ``requests`` adapter) makes its pools use connection
classes that arm the calling thread's deadline each time a request goes out on them
(urllib3's own retries included, each try with a deadline of its own). The caller says
how long a try may take with :func:`deadline_for`, around its ``session`` call, which
also tells whether the watchdog cut it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = ["DeadlineAdapter", "deadline_for"]


class _Cut:
    """Whether the watchdog cut the request of a :func:`deadline_for` block; ``end()``
    disarms it before the block's end (once the answer is read, before the connection
    goes back to the pool for another thread to use)."""

    __slots__ = ("cut",)

    def __init__(self) -> None:
        self.cut = False

    def end(self) -> None:
        _WATCHDOG.disarm()


class _Watchdog:
    """Shuts the socket of each armed request whose deadline has passed. One per
    process: its thread is started at the first request, and again in a forked child."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # thread ident -> (deadline, connection, the block's outcome)
        self._armed: dict[int, tuple[float, Any, _Cut]] = {}
        self._thread: threading.Thread | None = None

    def arm(self, conn: Any, seconds: float, outcome: _Cut) -> None:
        if self._pid != os.getpid():
            self._reset()  # (a forked child: the parent's thread and lock are not its own)
        with self._lock:
            self._armed[threading.get_ident()] = (time.monotonic() + seconds, conn, outcome)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="meter-request-deadlines", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def disarm(self) -> None:
        if self._pid != os.getpid():
            return
        with self._lock:
            self._armed.pop(threading.get_ident(), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                due = [(ident, armed) for ident, armed in self._armed.items() if armed[0] <= now]
                for ident, _ in due:
                    del self._armed[ident]
                if not due:
                    soonest = min((armed[0] for armed in self._armed.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
            for ident, (_, conn, outcome) in due:
                # (a connection another thread took since, from the pool, is not ours
                # to cut: its owner is the thread that sent the last request on it)
                if getattr(conn, "_meter_owner", None) == ident and _shut(conn):
                    outcome.cut = True


def _shut(conn: Any) -> bool:
    """End every wait on ``conn``'s socket: a read blocked in another thread returns at
    once (the base socket's shutdown, also under TLS: the SSL object stays in place for
    the reader to fail cleanly). False when it has no open socket (a try that failed
    and closed it, urllib3 retrying after a pause)."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return False
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # (closed meanwhile: nothing waits on it)
        return False
    return True


_WATCHDOG = _Watchdog()
_current = threading.local()  # .seconds and .outcome of this thread's deadline_for block


@contextmanager
def deadline_for(seconds: float) -> Iterator[_Cut]:
    """Within this block, each try of a request this thread makes through a
    :class:`DeadlineAdapter` must end within ``seconds``, its answer read; one that
    does not has its socket shut (the call then raises a connection error). The
    yielded object's ``cut`` says whether that happened. Read the answer's body within
    the block (the deadline covers it until the block ends)."""
    outcome = _Cut()
    _current.seconds, _current.outcome = seconds, outcome
    try:
        yield outcome
    finally:
        _current.seconds = _current.outcome = None
        _WATCHDOG.disarm()


def _arm(conn: Any) -> None:
    seconds = getattr(_current, "seconds", None)
    if seconds is not None:
        _WATCHDOG.arm(conn, seconds, _current.outcome)


class _Armed:
    """Arms the deadline as a try sends its request; a try that fails (a read timeout,
    a reset) disarms it, so that it cannot fire on the connection while urllib3 pauses
    before its next try (which arms a deadline of its own)."""

    _meter_owner: int | None = None  # the thread whose request went out last

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self._meter_owner = threading.get_ident()
        _arm(self)
        try:
            return super().request(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            _WATCHDOG.disarm()
            raise

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            _WATCHDOG.disarm()
            raise


class _DeadlineHTTPConnection(_Armed, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_Armed, HTTPSConnection):
    pass


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_POOLS = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections (direct or through a proxy) arm the
    deadline of :func:`deadline_for` at each request they send."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(*args, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager
