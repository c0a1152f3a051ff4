"""meter_django: usage metering for Django projects, on top of meter_core.

Add ``"meter_django"`` to ``INSTALLED_APPS``, a ``METER`` dict to the settings (see
``meter_django.conf``), ``meter_django.middleware.MeterMiddleware`` to ``MIDDLEWARE``,
and run ``migrate``. Then::

    from meter_django import record_usage, meter

    record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=3)
    await arecord_usage(...)        # from async code (required in durable mode)

    @meter("report.generated.small")
    def report(request): ...

Events that cannot be delivered land in the ``FailedMeterEvent`` table;
``manage.py retry_meter_events`` resends them. Importing this package needs no
configured settings: the names below are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meter_django.client import get_client, reset_client
    from meter_django.decorators import meter
    from meter_django.recording import (
        arecord_session,
        arecord_usage,
        record_session,
        record_usage,
    )

__all__ = [
    "arecord_session",
    "arecord_usage",
    "get_client",
    "meter",
    "record_session",
    "record_usage",
    "reset_client",
]

_LAZY = {
    "get_client": "meter_django.client",
    "reset_client": "meter_django.client",
    "meter": "meter_django.decorators",
    "record_usage": "meter_django.recording",
    "record_session": "meter_django.recording",
    "arecord_usage": "meter_django.recording",
    "arecord_session": "meter_django.recording",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meter_django' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
