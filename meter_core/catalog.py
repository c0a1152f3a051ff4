"""The meter catalog: every meter id the backend bills, as data.

``METERS`` maps a meter id to its :class:`Meter`. It starts with the 18 meters of the
wire protocol; :func:`register_meter` adds more (the catalog grows faster than releases).
Lookups are plain dict reads, safe from any thread; registration is meant for start-up.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = ["METERS", "Meter", "MeterType", "is_known_meter", "register_meter"]

MeterType = Literal["volume", "performance"]


@dataclass(frozen=True, slots=True)
class Meter:
    """One billable meter."""

    id: str
    name: str
    type: MeterType
    description: str


_CATALOG: tuple[tuple[str, str, MeterType, str], ...] = (
    ("page.processed.basic", "Basic Document Scanning", "volume",
     "Total number of basic pages processed"),
    ("page.processed.advanced", "Advanced Document Scanning", "volume",
     "Total number of advanced pages processed"),
    ("report.generated.small", "Small Report Generation", "volume",
     "Total number of small reports generated"),
    ("report.generated.medium", "Medium Report Generation", "volume",
     "Total number of medium reports generated"),
    ("report.generated.large", "Large Report Generation", "volume",
     "Total number of large reports generated"),
    ("report.generated.dataquery", "Data Query Report Generation", "volume",
     "Total number of data query reports generated"),
    ("report.generated.insights", "Insights Report Generation", "volume",
     "Total number of insights reports generated"),
    ("rule.executed.small", "Small Rule Execution", "volume",
     "Total number of rules executed with runtime less than 1 minute"),
    ("rule.executed.medium", "Medium Rule Execution", "volume",
     "Total number of rules executed with runtime between 1 and 3 minutes"),
    ("rule.executed.large", "Large Rule Execution", "volume",
     "Total number of rules executed with runtime greater than 4 minutes"),
    ("chat.on.time_hours", "Litewave AI Assistant Usage (Hours)", "performance",
     "Total active chat usage time in hours"),
    ("chat.query.time_secs", "Litewave AI Assistant Query Time (Seconds)", "performance",
     "Total time spent per query in seconds"),
    ("document.storage.size_gb", "Document Storage Size", "volume",
     "Total document storage consumed in GB"),
    ("template.processed.small", "Small Template Processing", "volume",
     "Total number of small templates processed"),
    ("template.processed.medium", "Medium Template Processing", "volume",
     "Total number of medium templates processed"),
    ("template.processed.large", "Large Template Processing", "volume",
     "Total number of large templates processed"),
    ("template.processed.count", "Template Licensing Count", "volume",
     "Total number of licensed templates processed"),
    ("template.licensed.total", "Yearly Template Setup", "volume",
     "Total yearly template setup count"),
)  # fmt: skip

_meters: dict[str, Meter] = {row[0]: Meter(*row) for row in _CATALOG}
_register_lock = threading.Lock()

#: Read-only view of the catalog, meter id -> Meter; it reflects later registrations.
METERS: Mapping[str, Meter] = MappingProxyType(_meters)


def register_meter(
    meter_id: str, name: str = "", type: MeterType = "volume", description: str = ""
) -> Meter:
    """Add a meter to the catalog and return it.

    Registering the same definition twice is a no-op; redefining an existing meter with
    other values raises ``ValueError`` (two parts of a program disagreeing is a bug).
    Bad arguments raise a ``ValueError`` naming the argument, before anything is
    registered: ``meter_id`` follows the rules of event ids
    (:class:`~meter_core.InvalidEvent`), ``name`` and ``description`` must be ``str``
    (an empty ``name`` is the id), ``type`` ``"volume"`` or ``"performance"``.
    """
    from meter_core.events import validate_identifier  # the same rules as event ids

    validate_identifier("meter_id", meter_id)
    for label, text in (("name", name), ("description", description)):
        if not isinstance(text, str):
            raise ValueError(f"{label}: must be a str, got {text!r}")
    if not isinstance(type, str) or type not in ("volume", "performance"):
        raise ValueError(f"type: must be 'volume' or 'performance', got {type!r}")
    meter = Meter(meter_id, name or meter_id, type, description)
    with _register_lock:
        existing = _meters.get(meter_id)
        if existing is not None and existing != meter:
            raise ValueError(f"meter_id: {meter_id!r} is already registered as {existing!r}")
        _meters[meter_id] = meter
    return meter


def is_known_meter(meter_id: str) -> bool:
    """Whether ``meter_id`` is in the catalog (built in or registered)."""
    return meter_id in _meters
