"""Database work asked for on an event loop's thread, where Django refuses it."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable

from django.db import connections

logger = logging.getLogger("meter.django")

# How long the loop's thread waits for a write handed off (a write takes milliseconds).
# Past it, the write goes on in its thread: the lock it waits for may be held by a thread
# that itself waits for this loop (sync code in a transaction calling async_to_sync),
# which could never let it go while the loop waits.
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


def run_off_loop(func: Callable[[], None], using: str, *, what: str) -> None:
    """``func()`` on a thread of its own, whose connection to ``using`` is closed when it
    ends. Waited for up to :data:`HANDOFF_WAIT` seconds: an exception raised by then is
    raised here; after that the call returns and ``func`` goes on, its failure logged
    as the loss of ``what``. For writes that would otherwise be lost, not a hot path."""
    done = threading.Event()
    lock = threading.Lock()
    failure: list[BaseException] = []
    abandoned = False

    def run() -> None:
        try:
            func()
        except BaseException as exc:
            with lock:
                if not abandoned:
                    failure.append(exc)
                    return
            logger.error("%s lost: the write handed off by async code failed: %s", what, exc,
                         exc_info=exc)  # fmt: skip
        finally:
            connections[using].close()
            done.set()

    threading.Thread(target=run, name="meter-loop-write", daemon=True).start()
    done.wait(HANDOFF_WAIT)
    with lock:
        if failure:
            raise failure[0]
        if not done.is_set():
            abandoned = True
