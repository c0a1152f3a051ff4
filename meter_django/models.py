"""FailedMeterEvent: the project's own table of usage events not delivered yet.

One row per ``event_id``. ``status`` follows meter_core's failure-store protocol:
``queued`` (written by ``record_usage`` in durable mode: the transactional outbox),
``failed`` (tried and failed; due again at ``next_attempt_at``), ``delivered`` and
``discarded`` (done; kept for the audit trail). ``leased_until`` / ``claim_token`` mark
the rows a worker holds: no other worker takes them until the lease ends.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

__all__ = [
    "DELIVERED",
    "DISCARDED",
    "FAILED",
    "PENDING_STATUSES",
    "QUEUED",
    "STATUSES",
    "FailedMeterEvent",
]

QUEUED = "queued"
FAILED = "failed"
DELIVERED = "delivered"
DISCARDED = "discarded"
STATUSES = (QUEUED, FAILED, DELIVERED, DISCARDED)
#: Statuses of events still owed to the backend.
PENDING_STATUSES = (QUEUED, FAILED)


class FailedMeterEvent(models.Model):
    """A usage event the backend does not have yet (or had, for delivered rows)."""

    event_id = models.UUIDField(unique=True, editable=False)
    payload = models.JSONField(help_text="The full event (meter_core UsageEvent.to_dict()).")
    tenant_id = models.CharField(max_length=128, db_index=True)
    device_id = models.CharField(max_length=128)
    meter_id = models.CharField(max_length=128, db_index=True)
    total_usage = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=[(s, s) for s in STATUSES], default=QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    next_attempt_at = models.DateTimeField(default=timezone.now)
    leased_until = models.DateTimeField(null=True, blank=True)
    claim_token = models.CharField(max_length=32, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "failed meter event"
        verbose_name_plural = "failed meter events"
        indexes = [
            # the retry query: status IN (queued, failed) AND next_attempt_at <= now
            # ORDER BY next_attempt_at; the partial index holds only what is still owed,
            # so millions of delivered rows cost it nothing
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status__in=PENDING_STATUSES),
                name="meter_event_due_idx",
            ),
            models.Index(fields=["status", "next_attempt_at"], name="meter_event_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.meter_id} x{self.total_usage} for {self.tenant_id} ({self.status})"

    @property
    def is_pending(self) -> bool:
        return self.status in PENDING_STATUSES
