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
        self._running = 0
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

        def work() -> None:  # on a write thread
            error: BaseException | None = None
            try:
                context.run(func, arg)
            except BaseException as exc:
                error = exc
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                if error is not None:
                    _log_orphaned(error)

        with self._idle:
            self._running += 1
        try:
            _shared_pool().submit(work)
        except BaseException:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()
            raise
        await waiter

    def wait(self, timeout: float | None) -> bool:
        """Wait until no handed-off write is running or queued; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)


def _log_orphaned(error: BaseException) -> None:
    logger.error("a store write whose caller was cancelled failed: %s", error, exc_info=error)
