"""Views of the test project: plain, async, decorated (functions and methods of
class-based and DRF views), DRF token-authenticated, a DRF view set behind a router."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from rest_framework.authentication import TokenAuthentication
from rest_framework.decorators import action, api_view, authentication_classes, permission_classes
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.viewsets import ViewSet

from meter_django import meter, record_usage


def ok(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    return HttpResponse("ok")


def scan(request: HttpRequest, pk: int) -> HttpResponse:
    response = HttpResponse("scanned")
    response["X-Pages"] = request.GET.get("pages", "3")
    return response


def failing(request: HttpRequest) -> HttpResponse:
    return HttpResponse("bad", status=400)


def self_metered(request: HttpRequest) -> HttpResponse:
    request.meter.add("report.generated.medium", 4)  # type: ignore[attr-defined]
    return HttpResponse("ok", status=int(request.GET.get("status", "200")))


async def async_view(request: HttpRequest) -> HttpResponse:
    request.meter.add("report.generated.large", 2)  # type: ignore[attr-defined]
    return HttpResponse("async ok")


@meter("page.processed.advanced", usage=lambda request, response: int(response["X-Count"]))
def decorated(request: HttpRequest) -> HttpResponse:
    response = HttpResponse("decorated")
    response["X-Count"] = "5"
    return response


@meter("template.processed.small", usage=3)
async def decorated_async(request: HttpRequest) -> HttpResponse:
    return HttpResponse("decorated async", status=int(request.GET.get("status", "200")))


class ReportView(View):
    @meter("report.generated.small")
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("report", status=int(request.GET.get("status", "200")))

    @meter("report.generated.medium", usage=lambda request, response: int(response["X-Count"]))
    def post(self, request: HttpRequest) -> HttpResponse:
        response = HttpResponse("reports")
        response["X-Count"] = "2"
        return response


class AsyncReportView(View):
    @meter("report.generated.large", usage=4)
    async def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("async report")


@method_decorator(meter("template.processed.large"), name="dispatch")
class DispatchDecoratedView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("dispatch")


@method_decorator(
    meter("template.processed.medium", usage=lambda request, response: int(response["X-Count"])),
    name="dispatch",
)
class AsyncDispatchDecoratedView(View):
    async def get(self, request: HttpRequest) -> HttpResponse:
        response = HttpResponse("async dispatch")
        response["X-Count"] = "6"
        return response


def _users_plus_one(request: HttpRequest, response: HttpResponse) -> int:
    from django.contrib.auth.models import User

    return User.objects.count() + 1


# a usage callable that asks the database (Django refuses that on the event loop)
@meter("rule.executed.medium", usage=_users_plus_one)
async def decorated_async_counting(request: HttpRequest) -> HttpResponse:
    return HttpResponse("counted")


class DRFReportView(APIView):
    authentication_classes = [TokenAuthentication]
    permission_classes = [IsAuthenticated]

    # the usage callable gets DRF's Request (query_params) and Response (data)
    @meter(
        "report.generated.dataquery",
        usage=lambda request, response: len(response.data) + len(request.query_params),
    )
    def get(self, request: Request) -> Response:
        return Response(["a", "b", "c"])


@api_view(["GET"])
@authentication_classes([TokenAuthentication])
@permission_classes([IsAuthenticated])
def drf_view(request: Request) -> Response:
    request.meter.add("rule.executed.small", 1)
    return Response({"user": request.user.get_username()})


class VsDocViewSet(ViewSet):
    """Routed by a DRF router: its URL patterns are regular expressions."""

    def retrieve(self, request: Request, pk: str) -> Response:
        return Response({"pk": pk})

    @action(detail=True, methods=["post"])
    def scan(self, request: Request, pk: str) -> Response:
        return Response({"scanned": pk})


def record_in_transaction(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        event_id = record_usage(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    return JsonResponse({"event_id": event_id})
