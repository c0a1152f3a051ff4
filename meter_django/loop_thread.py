"""Database work asked for on an event loop's thread, where Django refuses it."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable

from django.db import connections

logger = logging.getLogger("meter.django")

#: How long the loop's thread waits for a write handed off (one takes milliseconds).
#: Past it, the write goes on in its thread: the lock it waits for may be held by sync
#: code that itself waits for this loop (a transaction around async_to_sync()), which
#: could not let it go while the loop waits.
HANDOFF_WAIT = 0.5


def in_event_loop() -> bool:
    """Whether this thread runs an event loop (where Django refuses database access,
    unless DJANGO_ALLOW_ASYNC_UNSAFE is set)."""
    if os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE"):
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_off_loop(func: Callable[[], None], using: str, *, what: str) -> bool:
    """``func()`` on a thread of its own, whose connection to ``using`` is closed when it
    ends. True once it has returned, within :data:`HANDOFF_WAIT` seconds; its exception
    is raised here. False: it is still running, and goes on; if it then fails, the
    failure is logged as the loss of ``what`` (the caller, told False, treats the write
    as failed: a late success only means it was not lost after all)."""
    done = threading.Event()
    lock = threading.Lock()
    failure: list[BaseException] = []
    abandoned = [False]

    def run() -> None:
        try:
            try:
                func()
            except BaseException as exc:
                with lock:
                    if not abandoned[0]:
                        failure.append(exc)
                        return
                logger.error("%s lost: its write, handed off by async code, failed: %s",
                             what, exc, exc_info=exc)  # fmt: skip
            finally:
                connections[using].close()
        finally:
            done.set()

    threading.Thread(target=run, name="meter-loop-write", daemon=True).start()
    try:
        done.wait(HANDOFF_WAIT)
    finally:  # (also when the wait itself is interrupted)
        with lock:
            if not done.is_set() and not failure:
                abandoned[0] = True
    if failure:
        raise failure[0]
    return not abandoned[0]
