"""Database work asked for on an event loop's thread, where Django refuses it."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

from django.db import connections


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


def run_off_loop(func: Callable[[], None], using: str) -> None:
    """``func()`` on a thread of its own, waited for; its exception is raised here. The
    thread's connection to ``using`` is closed when it ends. The loop waits for the call
    (a lock held by sync code that itself waits on this loop would hold it up to the
    database's lock timeout): for a rare write that would otherwise be lost."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            func()
        except BaseException as exc:
            failure.append(exc)
        finally:
            connections[using].close()

    thread = threading.Thread(target=run, name="meter-loop-write", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
