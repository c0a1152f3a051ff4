"""The HTTP transport's quick retries (urllib3's ``Retry``), and their log lines.

urllib3 logs a WARNING on ``urllib3.connectionpool`` for each retry of a broken
connection ("Retrying (Retry(total=1, ...)) after connection broken by ..."). During an
outage the sender makes an attempt every few seconds, each retried twice by urllib3: a
line a second or more in the host app's log, from a library it did not ask to talk. The
transport's retries are of a class of their own, :class:`ConnectionRetry`, and a filter
on that logger, added when the first transport is built, turns their lines (and only
theirs: the app's own urllib3 pools are left alone) into one line per 10 s on
``meter.transport``, with the count of those held back. Nothing else of the host's
logging is touched.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from urllib3.util.retry import Retry

from meter_core.usage import LogThrottle

__all__ = ["ConnectionRetry", "quiet_urllib3_retry_lines"]

logger = logging.getLogger("meter.transport")
_URLLIB3_LOGGER = "urllib3.connectionpool"


class ConnectionRetry(Retry):
    """urllib3's ``Retry``, as the transport configures it; a class of its own so that
    urllib3's log records about it can be told from the app's (``Retry.new`` keeps the
    class)."""


class _RetryLines(logging.Filter):
    """Passes every record but urllib3's "Retrying ..." lines about a ConnectionRetry,
    which it logs through a throttle on ``meter.transport`` instead."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = LogThrottle(logger, interval=10.0)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and args and isinstance(args[0], ConnectionRetry)):
            return True
        with contextlib.suppress(Exception):  # (a filter must not raise into urllib3)
            self._throttle.log(
                record.levelno,
                "meter backend connection retried at once by urllib3: %s",
                record.getMessage(),
            )
        return False


_FILTER = _RetryLines()
_install_lock = threading.Lock()


def quiet_urllib3_retry_lines() -> None:
    """Add the filter to urllib3's connection pool logger (once; idempotent)."""
    with _install_lock:
        target = logging.getLogger(_URLLIB3_LOGGER)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
