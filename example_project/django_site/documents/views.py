"""Four ways of metering a view, one per view:

- ``scan``: a rule in ``settings.METER["RULES"]`` (route template + method);
- ``export_report``: the ``@meter`` decorator;
- ``search``: the view adds usage itself with ``request.meter.add(...)``;
- ``create_template``: ``record_usage()`` inside a transaction, billed only if it commits.

Every one of them is billed only for a 2xx response, to the logged-in user's tenant.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from example_project.django_site.documents.models import Template
from meter_django import meter, record_usage


@login_required
def index(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"user": request.user.get_username(), "tenant": request.user.tenant_id})  # type: ignore[union-attr]


@require_POST
@login_required
def scan(request: HttpRequest, doc_id: int) -> HttpResponse:
    if doc_id <= 0:
        return JsonResponse({"error": "no such document"}, status=404)  # not metered
    return JsonResponse({"doc_id": doc_id, "status": "scanned"})


@require_POST
@login_required
@meter("report.generated.medium")
def export_report(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"report": "medium", "status": "generated"})


@require_GET
@login_required
def search(request: HttpRequest) -> HttpResponse:
    hits = [f"doc-{i}" for i in range(int(request.GET.get("hits", "3")))]
    request.meter.add("report.generated.dataquery", len(hits))  # type: ignore[attr-defined]
    return JsonResponse({"q": request.GET.get("q", ""), "hits": hits})


class _Refused(Exception):
    pass


@require_POST
@login_required
def create_template(request: HttpRequest) -> HttpResponse:
    name = request.POST.get("name", "")
    tenant = request.user.tenant_id  # type: ignore[union-attr]
    try:
        with transaction.atomic():
            Template.objects.create(tenant_id=tenant, name=name)
            # Recorded when the transaction commits; a rollback bills nothing.
            record_usage(tenant_id=tenant, meter_id="template.licensed.total", total_usage=1)
            if not name.strip():
                raise _Refused("a template needs a name")
    except _Refused as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"template": name, "status": "created"}, status=201)
