"""The process's one MeterClient, built lazily from ``settings.METER``.

:func:`get_client` builds the client on first use (never at start-up, and building does
no network I/O), then returns the same one from every thread. meter_core flushes and
closes it at interpreter exit and starts a fresh sender in a forked child.
:func:`reset_client` closes it, and the database connection its sender thread kept, so the
next call builds a new one from the current settings; it runs by itself when the ``METER``
setting changes (``override_settings``) and before the test runner creates or drops a test
database (see :mod:`meter_django.signals`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.utils.module_loading import import_string

from meter_core import ConfigurationError, FailureStore, MeterClient

__all__ = ["build_client", "build_store", "get_client", "reset_client"]

logger = logging.getLogger("meter.django")

_lock = threading.Lock()
_client: MeterClient | None = None


def build_store(value: Any, using: str) -> FailureStore | None:
    """The failure store named by ``METER["STORE"]``: ``"database"`` (the
    FailedMeterEvent table on ``using``), ``"memory"`` (None: the client's bounded
    in-memory list), a FailureStore, or the dotted path of one or of a factory."""
    if value == "database":
        from meter_django.store import DatabaseFailureStore

        return DatabaseFailureStore(using)
    if value == "memory" or value is None:
        return None
    if isinstance(value, str):
        path = value
        try:
            value = import_string(path)
        except ImportError as exc:
            raise ConfigurationError(f"METER['STORE']: cannot import {path!r}: {exc}") from None
        if not isinstance(value, FailureStore) and callable(value):
            try:
                value = value()
            except Exception as exc:  # (a factory that fails: an error of the setting)
                raise ConfigurationError(
                    f"METER['STORE']: {path!r} raised {type(exc).__name__}: {exc}"
                ) from exc
    if not isinstance(value, FailureStore):
        raise ConfigurationError(
            "METER['STORE']: must be 'database', 'memory', a meter_core.FailureStore or "
            f"its dotted path, got {value!r}"
        )
    return value


def build_client() -> MeterClient:
    """A new client from the current settings. Raises ConfigurationError."""
    from meter_django.conf import conf

    options = conf.client_options()
    if options.get("failure_store") is None:
        options["failure_store"] = build_store(conf.get("STORE"), conf.database)
    return MeterClient(**options)


def get_client() -> MeterClient:
    """The process's client (built on first call). Raises ConfigurationError when the
    settings cannot make one; ``manage.py check`` reports the same problem earlier."""
    global _client
    client = _client
    if client is not None:
        return client
    with _lock:
        if _client is None:
            _client = build_client()
            logger.debug("meter client ready: %r", _client)
        return _client


def reset_client(timeout: float | None = 2.0) -> None:
    """Close the current client (flushing for up to ``timeout`` seconds; what is left
    goes to its failure store), close the database connection its sender thread kept
    (``STORE`` "database"), and forget it: the next :func:`get_client` builds a new one
    from the settings of that moment."""
    global _client
    with _lock:
        client, _client = _client, None
    if client is None:
        return
    try:
        client.close(timeout=timeout)
    except Exception:
        logger.exception("closing the meter client failed")
    from meter_django.store import DatabaseFailureStore

    store = client.failure_store
    if isinstance(store, DatabaseFailureStore):
        store.close_connections()
