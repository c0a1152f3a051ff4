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

import logging
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

logger = logging.getLogger("meter.transport")


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
    process: its thread is started at the first armed request (again in a forked child,
    whose state is made anew by the fork hook)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # thread ident -> (deadline, connection, the block's outcome)
        self._armed: dict[int, tuple[float, Any, _Cut]] = {}
        self._thread: threading.Thread | None = None

    def own(self, conn: Any, seconds: float | None, outcome: _Cut | None) -> None:
        """A request of the current thread goes out on ``conn``: the thread owns it from
        now on (a deadline of another thread's that comes due can no longer cut it), and
        its own deadline, when given, is armed."""
        ident = threading.get_ident()
        with self._lock:
            conn._meter_owner = ident
            if seconds is None or outcome is None:
                return
            outcome.cut = False  # (says whether the last try was cut: urllib3 may retry)
            self._armed[ident] = (time.monotonic() + seconds, conn, outcome)
            if self._thread is None and not self._start():
                del self._armed[ident]  # (no watchdog: the request goes on without one)
                return
            self._changed.notify()

    def _start(self) -> bool:
        thread = threading.Thread(target=self._run, name="meter-request-deadlines", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no new thread at interpreter exit (3.12+): none this time
            return False
        self._thread = thread
        return True

    def disarm(self) -> None:
        with self._lock:
            self._armed.pop(threading.get_ident(), None)

    def _run(self) -> None:
        while True:
            try:
                self._cut_due()
            except Exception:  # (never expected: the watchdog must outlive a bug)
                logger.exception("the request deadline watchdog failed; it goes on")
                time.sleep(0.1)

    def _cut_due(self) -> None:
        with self._lock:
            now = time.monotonic()
            due = [(ident, armed) for ident, armed in self._armed.items() if armed[0] <= now]
            if not due:
                soonest = min((armed[0] for armed in self._armed.values()), default=None)
                self._changed.wait(None if soonest is None else soonest - now)
                return
            for ident, (_, conn, outcome) in due:
                del self._armed[ident]
                # Under the lock, as a request's own() is: a connection another thread
                # took since, from the pool, is its own, not ours to cut.
                if getattr(conn, "_meter_owner", None) == ident and _shut(conn):
                    outcome.cut = True


def _shut(conn: Any) -> bool:
    """End every wait on ``conn``'s socket: a read blocked in another thread returns at
    once (the base socket's shutdown, also under TLS: the SSL object stays in place for
    the reader to fail cleanly). False when it has no open socket (a try that failed
    and closed it, urllib3 retrying after a pause) or it cannot be shut."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return False
    try:
        if isinstance(sock, socket.socket):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        else:  # (TLS in TLS through an HTTPS proxy: urllib3's SSLTransport wraps one)
            inner = getattr(sock, "socket", None)
            if not isinstance(inner, socket.socket):
                return False
            socket.socket.shutdown(inner, socket.SHUT_RDWR)
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
    _WATCHDOG.own(conn, getattr(_current, "seconds", None), getattr(_current, "outcome", None))


if hasattr(os, "register_at_fork"):  # a forked child: the parent's thread and lock are gone
    os.register_at_fork(after_in_child=_WATCHDOG._reset)


class _Armed:
    """Arms the deadline as a try sends its request; a try that fails (a read timeout,
    a reset) disarms it, so that it cannot fire on the connection while urllib3 pauses
    before its next try (which arms a deadline of its own)."""

    _meter_owner: int | None = None  # the thread whose request went out last

    def request(self, *args: Any, **kwargs: Any) -> Any:
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
