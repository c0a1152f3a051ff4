"""Telling, without waiting, whether the client of a request has already left.

A server that knows the connection is closed answers ``receive()`` with
``http.disconnect`` at once. uvicorn does, yet it also accepts the response sent to
that closed connection without an error (the ASGI spec suggests raising OSError, which
the middleware takes as a response that did not end), so the middleware asks it before
the end of a response it would bill: a caller that gave up (a client timeout, a closed
tab) did not get the result and is not billed for it.
"""

from __future__ import annotations

import contextlib
import types

from meter_asgi.types import Receive

__all__ = ["client_gone"]


# Servers whose own receive() is asked: one step of it is safe to abandon (it waits on an
# asyncio event), and they accept a response sent to a closed connection without an
# error. A receive wrapped by another middleware is never stepped: it may hold a task
# group or a cancel scope, which must not be left half entered.
_SERVER_MODULES = ("uvicorn.",)


def client_gone(receive: Receive) -> bool:
    """True when the server's ``receive()`` answers ``http.disconnect`` without
    waiting. A receive that would wait (the client is still there) is abandoned where it
    stopped, which consumes nothing. False, without asking, for a receive that is not a
    known server's own (see ``_SERVER_MODULES``). Never raises. Call it only once the app
    has read the request body it wants: a body message it had not read yet would be
    consumed and dropped."""
    server = getattr(receive, "__self__", None)
    if server is None or not type(server).__module__.startswith(_SERVER_MODULES):
        return False
    try:
        pending = receive()
    except Exception:
        return False
    if not isinstance(pending, types.CoroutineType):  # (not put back: leave it be)
        close = getattr(pending, "close", None)
        if callable(close):
            close()
        return False
    try:
        pending.send(None)  # one step: it yields only if it has to wait
    except StopIteration as answered:
        message = answered.value
        return isinstance(message, dict) and message.get("type") == "http.disconnect"
    except Exception:
        return False
    # its own cleanup runs (an asyncio waiter is removed); one that ignores the close
    # raises RuntimeError: nothing more to do about it
    with contextlib.suppress(RuntimeError):
        pending.close()
    return False
