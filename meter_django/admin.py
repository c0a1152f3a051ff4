"""Admin of FailedMeterEvent: browse, filter and search stored events, look at their
payload (read-only), and act on them: "retry now" resends the selected events at once,
"discard" gives up on them. Nothing here shows the API key (it is not stored).

Every read and write goes to the database of ``METER["DATABASE"]``, router or not (as
Django's multi-database admin recipe does, with ``using()``). The changelist view, where
the actions run, never runs inside the request transaction of that database
(``ATOMIC_REQUESTS``): "retry now" claims, sends and marks events in units of work of
its own, so a later error in the request cannot roll back the record of events already
delivered (they would be sent again), and SQLite's write lock is not held while events
are on the wire."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import ngettext

from meter_core import ConfigurationError, StoreError
from meter_django.conf import conf
from meter_django.models import PENDING_STATUSES, FailedMeterEvent
from meter_django.retry import retry_events
from meter_django.store import DatabaseFailureStore

#: Most events the "retry now" action resends within one admin request.
MAX_RETRY_NOW = 5000

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[FailedMeterEvent]
else:  # ModelAdmin is generic only in the type stubs
    _ModelAdmin = admin.ModelAdmin

_TOP_CHOICES = 20
_ERROR_LABEL = 80


class _TopOwedFilter(admin.SimpleListFilter):
    """The most frequent values of a field among owed events (queued or failed), most
    frequent first: counted on owed rows only, which the (status, ...) index finds, so the
    sidebar costs little on a table that keeps every delivered row. Any value can still
    be filtered on by URL (``?tenant_id=acme``)."""

    field = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        rows = (
            model_admin.get_queryset(request)
            .filter(status__in=PENDING_STATUSES)
            .exclude(**{self.field: ""})
            .values(self.field)
            .annotate(n=Count("id"))
            .order_by("-n")[:_TOP_CHOICES]
        )
        return [(row[self.field], _short(row[self.field])) for row in rows]

    def has_output(self) -> bool:
        # (Django applies a filter only when it has output: a value given by URL must be
        # applied even when no owed event has it, as in the healthy steady state)
        return bool(self.value()) or super().has_output()

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[FailedMeterEvent]
    ) -> QuerySet[FailedMeterEvent]:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class LastErrorFilter(_TopOwedFilter):
    """The most frequent last errors of owed events."""

    title = "last error"
    parameter_name = field = "last_error"


class TenantFilter(_TopOwedFilter):
    """The tenants with the most owed events (a list of every tenant would scan the
    whole table at each page, and be thousands long)."""

    title = "tenant (most owed)"
    parameter_name = field = "tenant_id"


def _short(text: str) -> str:
    return text if len(text) <= _ERROR_LABEL else text[: _ERROR_LABEL - 1] + "…"


class _MeterDatabase(set[str]):
    """``_non_atomic_requests`` of the changelist view: holds the alias of
    ``METER["DATABASE"]`` as it is at each request (Django reads it per request in
    ``BaseHandler.make_view_atomic``), besides any alias added to it."""

    def __contains__(self, alias: object) -> bool:
        if super().__contains__(alias):
            return True
        try:
            return alias == conf.database
        except ConfigurationError:
            return False


@admin.register(FailedMeterEvent)
class FailedMeterEventAdmin(_ModelAdmin):
    list_display = (
        "event_id",
        "tenant_id",
        "meter_id",
        "total_usage",
        "status",
        "attempts",
        "error",
        "next_attempt_at",
        "created_at",
    )
    list_filter = ("status", "meter_id", TenantFilter, LastErrorFilter)
    # (an event id is looked up exactly, through its unique index: get_search_results)
    search_fields = ("tenant_id", "meter_id", "device_id")
    ordering = ("-id",)
    date_hierarchy = None
    list_per_page = 100
    show_full_result_count = False
    actions = ("retry_now", "discard")
    fields = (
        "event_id",
        "status",
        "tenant_id",
        "device_id",
        "meter_id",
        "total_usage",
        "attempts",
        "last_error",
        "next_attempt_at",
        "leased_until",
        "created_at",
        "updated_at",
        "payload_pretty",
    )
    readonly_fields = fields

    @admin.display(description="last error")
    def error(self, obj: FailedMeterEvent) -> str:
        return _short(obj.last_error)

    @admin.display(description="payload")
    def payload_pretty(self, obj: FailedMeterEvent) -> SafeString:
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True))

    def get_queryset(self, request: HttpRequest) -> QuerySet[FailedMeterEvent]:
        queryset: QuerySet[FailedMeterEvent] = super().get_queryset(request).using(conf.database)
        return queryset

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return super().changelist_view(request, extra_context)

    # Not in the request transaction of the meter database (see the module docstring):
    # ModelAdmin.get_urls copies this attribute onto the URL's view, where
    # ATOMIC_REQUESTS looks for it, as for a view under @transaction.non_atomic_requests.
    changelist_view._non_atomic_requests = _MeterDatabase()  # type: ignore[attr-defined]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[FailedMeterEvent], search_term: str
    ) -> tuple[QuerySet[FailedMeterEvent], bool]:
        try:
            event_id = uuid.UUID(search_term.strip())
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        # an event id through its unique index, or ids of tenants and devices (often UUIDs
        # too) matched exactly
        term = search_term.strip()
        found = queryset.filter(Q(event_id=event_id) | Q(tenant_id=term) | Q(device_id=term))
        return found, False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # An owed event deleted would never be billed (lost without a trace): discard
        # it instead, which keeps the row. Done ones may go, one by one.
        if obj is None or obj.status in PENDING_STATUSES:
            return False
        return super().has_delete_permission(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # rows change only through the actions; the detail page is read-only
        return False if obj is not None else super().has_change_permission(request)

    @admin.action(description="Retry now (resend the selected events)", permissions=["change"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[FailedMeterEvent]) -> None:
        # The resend runs inside this admin request: a selection of the whole table would
        # keep it waiting for minutes. Larger backlogs are the retry command's job.
        ids = [str(i) for i in queryset.values_list("event_id", flat=True)[: MAX_RETRY_NOW + 1]]
        if len(ids) > MAX_RETRY_NOW:
            self.message_user(
                request,
                f"Select at most {MAX_RETRY_NOW} events to retry from here; for more, run "
                "`python manage.py retry_meter_events` (it takes --tenant and --meter).",
                messages.WARNING,
            )
            return
        try:
            report = retry_events(event_ids=ids, batch_size=500)
        except (ConfigurationError, StoreError) as exc:
            self.message_user(request, f"Nothing resent: {exc}", messages.ERROR)
            return
        level = messages.SUCCESS if report.ok else messages.WARNING
        self.message_user(request, report.summary(), level)

    @admin.action(description="Discard (never send the selected events)", permissions=["change"])
    def discard(self, request: HttpRequest, queryset: QuerySet[FailedMeterEvent]) -> None:
        owed = [
            str(i)
            for i in queryset.filter(status__in=PENDING_STATUSES).values_list("event_id", flat=True)
        ]
        try:
            n = DatabaseFailureStore(conf.database).discard(owed)
        except (ConfigurationError, StoreError) as exc:
            self.message_user(request, f"Nothing discarded: {exc}", messages.ERROR)
            return
        if not owed:
            self.message_user(
                request,
                "Nothing discarded: only events still owed (queued or failed) can be.",
                messages.WARNING,
            )
            return
        if n < len(owed):  # leased: a sender has them on the wire right now
            self.message_user(
                request,
                ngettext("Discarded %(n)d event; ", "Discarded %(n)d events; ", n) % {"n": n}
                + ngettext("%(left)d is", "%(left)d are", len(owed) - n) % {"left": len(owed) - n}
                + " being sent right now (or delivered meanwhile) and left alone: look again "
                "once their lease has ended.",
                messages.WARNING,
            )
            return
        done = ngettext("Discarded %(n)d event.", "Discarded %(n)d events.", n) % {"n": n}
        self.message_user(request, done, messages.SUCCESS)
