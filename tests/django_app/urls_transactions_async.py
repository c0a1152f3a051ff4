"""URLs of test_transactions_async (used with override_settings(ROOT_URLCONF=...))."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

from meter_django import arecord_session, arecord_usage, record_usage


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def body() -> Iterator[bytes]:
        for _ in range(3):
            request.meter.add("page.processed.basic", 1)  # type: ignore[attr-defined]
            yield b"chunk\n"

    response = StreamingHttpResponse(body())
    response["X-Rows"] = "5"
    return response


def astream(request: HttpRequest) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(2):
            request.meter.add("page.processed.basic", 1)  # type: ignore[attr-defined]
            yield b"chunk\n"

    return StreamingHttpResponse(body())


async def async_record(request: HttpRequest) -> HttpResponse:
    await arecord_usage(tenant_id="acme", meter_id="template.licensed.total", total_usage=1)
    await arecord_session(
        tenant_id="acme", meter_id="chat.on.time_hours", start_time=1_700_000_000_000
    )
    return HttpResponse("ok")


async def async_record_sync_call(request: HttpRequest) -> HttpResponse:
    record_usage(tenant_id="acme", meter_id="template.licensed.total", total_usage=1)
    return HttpResponse("ok")


def plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


async def async_plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [
    path("stream/", stream),
    path("astream/", astream),
    path("async-record/", async_record),
    path("async-record-sync/", async_record_sync_call),
    path("plain/", plain),
    path("async-plain/", async_plain),
]
