"""Telling, without waiting and without consuming anything, whether the client of a
request has already left.

uvicorn accepts a response sent to a closed connection without an error (the ASGI spec
suggests raising OSError, which the middleware takes as a response that did not end), so
a caller that gave up (a client timeout, a closed tab) would be billed for a result it
never got. Its request cycle, whose method is the ``receive`` the app is given, keeps a
``disconnected`` flag that it sets when the connection is lost (and answers
``http.disconnect`` from then on): the middleware reads that flag as the response ends.
Asking ``receive()`` itself could wait, or take a body message the app has not read.
"""

from __future__ import annotations

from meter_asgi.types import Receive

__all__ = ["client_gone"]


def client_gone(receive: Receive) -> bool:
    """True when ``receive`` is a bound method of a server request cycle that says its
    connection is lost (uvicorn's ``disconnected``, a bool). False for any other receive
    (another server, a middleware's wrapper): the client is then taken to be there. Never
    raises, never waits."""
    try:
        cycle = getattr(receive, "__self__", None)
        return cycle is not None and getattr(cycle, "disconnected", None) is True
    except Exception:  # (an attribute that raises: someone else's object)
        return False
