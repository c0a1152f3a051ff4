"""Store writes handed off by async code: they run on threads of the library's own, so
the event loop never waits on a disk or database lock, and once handed off they run to
the end whatever happens to the caller.

asyncio's ``to_thread`` would not do: cancelling the caller (a request timeout, a server
shutting down) cancels a job still queued in the loop's executor, and the events it was
to write would be lost without a word. Here a cancellation only stops the caller's wait;
the write goes on, a failure nobody waits for any more is logged, and :meth:`wait`
(which ``flush()`` and ``close()`` call) waits for writes still running. At interpreter
exit the pool's threads finish the writes queued before exit.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["StoreWrites"]

logger = logging.getLogger("meter.client")

_T = TypeVar("_T")

_MAX_THREADS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            pool = _pool
            if pool is None:
                pool = _pool = ThreadPoolExecutor(_MAX_THREADS, "meter-store-write")
    return pool


def _forget_pool_in_child() -> None:
    # the parent's threads do not exist in a forked child: it makes its own pool
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


class StoreWrites:
    """The store writes of one client that async callers handed off. Thread-safe."""

    def __init__(self) -> None:
        self._pending: set[int] = set()  # tickets of writes queued or running
        self._tickets = itertools.count()
        self._idle = threading.Condition()

    async def run(self, func: Callable[[_T], None], arg: _T) -> None:
        """Run ``func(arg)`` on a write thread and wait for it; its exception is raised
        here. Cancelled, the caller stops waiting and the write goes on."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        context = contextvars.copy_context()

        def settle(error: BaseException | None) -> None:  # on the loop
            if waiter.done():  # the caller was cancelled: nobody to raise it to
                if error is not None:
                    _log_orphaned(error)
            elif error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

        def work() -> None:  # on a write thread (or inline, see below)
            error: BaseException | None = None
            _current.ticket = ticket
            try:
                context.run(func, arg)
            except BaseException as exc:
                error = exc
            finally:
                _current.ticket = None
                with self._idle:
                    self._pending.discard(ticket)
                    self._idle.notify_all()
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                if error is not None:
                    _log_orphaned(error)

        with self._idle:
            ticket = next(self._tickets)
            self._pending.add(ticket)
        try:
            _shared_pool().submit(work)
        except RuntimeError:
            # The interpreter is shutting down and the pool takes no more work: written
            # here, on the loop's thread, rather than dropped.
            work()
        await waiter

    def wait(self, timeout: float | None) -> bool:
        """Wait until the writes handed off before this call have ended (those handed
        off meanwhile are not waited for, nor the write of the calling thread itself,
        when a hook or a store calls this from one); False on timeout."""
        own = getattr(_current, "ticket", None)
        with self._idle:
            before = next(self._tickets)  # (a ticket number no write will have)
            return self._idle.wait_for(
                lambda: not any(t < before and t != own for t in self._pending), timeout
            )


_current = threading.local()  # .ticket: the write this thread is running, if any


def _log_orphaned(error: BaseException) -> None:
    logger.error("a store write whose caller was cancelled failed: %s", error, exc_info=error)
