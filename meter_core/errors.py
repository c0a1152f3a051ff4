"""Exceptions raised by meter_core.

Every exception the suite raises on purpose derives from :class:`MeterError`::

    MeterError
    ├── ConfigurationError      (also a ValueError) bad client options, raised at construction
    ├── InvalidEvent            (also a ValueError) an event that fails validation; names the field
    ├── StoreError              the failure store could not read or write
    └── DeliveryError           the backend did not take an event
        ├── CustomerNotFound        the tenant has no customer account (not retriable)
        ├── DeliveryRejected        a 4xx answer or a non-retriable record error (not retriable)
        └── BackendUnavailable      5xx, network error, timeout, unreadable answer (retriable)
            └── RateLimited         429; ``retry_after`` holds the server's hint in seconds

Errors of ``requests`` and ``sqlite3`` are translated with ``raise ... from exc`` so the
cause stays visible. No message ever contains the API key.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ConfigurationError",
    "CustomerNotFound",
    "DeliveryError",
    "DeliveryRejected",
    "InvalidEvent",
    "MeterError",
    "RateLimited",
    "StoreError",
]


class MeterError(Exception):
    """Root of every exception meter_core raises on purpose."""


class ConfigurationError(MeterError, ValueError):
    """A client option or an adapter setting is missing or malformed, or a call needs
    what the configuration rules out (resending through a disabled client). Raised when
    the client or adapter is built, or by the call that needs the setting."""


class InvalidEvent(MeterError, ValueError):
    """A usage event failed validation.

    ``field`` names the offending argument (``"total_usage"``, ``"metadata"``...), so a
    caller can tell what to fix without parsing the message.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StoreError(MeterError):
    """The failure store could not be read or written."""


class DeliveryError(MeterError):
    """The backend did not accept an event.

    ``retriable`` tells whether sending the same event again later may succeed.
    ``status`` is the HTTP status when there was one, ``error_code`` the REST Proxy's code.
    """

    retriable: bool = False

    def __init__(
        self, message: str, *, status: int | None = None, error_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class CustomerNotFound(DeliveryError):
    """The customer lookup found no account for the tenant. Not retriable."""


class DeliveryRejected(DeliveryError):
    """The backend refused the request or a record (4xx, or error code 50002). Not retriable."""


class BackendUnavailable(DeliveryError):
    """The backend could not be reached or failed (5xx, network, timeout). Retriable."""

    retriable = True


class RateLimited(BackendUnavailable):
    """The backend answered 429. ``retry_after`` is its Retry-After hint in seconds, if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        error_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, error_code=error_code)
        self.retry_after = retry_after
