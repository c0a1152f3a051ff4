"""URLs of the test project."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from rest_framework.routers import SimpleRouter

from tests.django_app import views

documents = (
    [
        path("<int:pk>/scan", views.scan, name="scan"),
        path("<int:pk>/export", views.ok, name="export"),
    ],
    "documents",
)

# DRF routers register regular-expression patterns: ^vs-docs/(?P<pk>[^/.]+)/scan/$
router = SimpleRouter()
router.register("vs-docs", views.VsDocViewSet, basename="vsdoc")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("ok/", views.ok, name="ok"),
    path("documents/", include(documents)),
    path("failing/", views.failing, name="failing"),
    path("self-metered/", views.self_metered, name="self-metered"),
    path("async/", views.async_view, name="async"),
    path("decorated/", views.decorated, name="decorated"),
    path("decorated-async/", views.decorated_async, name="decorated-async"),
    path("api/whoami/", views.drf_view, name="drf"),
    path("reports/", views.ReportView.as_view(), name="reports"),
    path("reports-async/", views.AsyncReportView.as_view(), name="reports-async"),
    path("reports-dispatch/", views.DispatchDecoratedView.as_view(), name="reports-dispatch"),
    path("reports-dispatch-async/", views.AsyncDispatchDecoratedView.as_view()),
    path("decorated-async-counting/", views.decorated_async_counting),
    path("api/reports/", views.DRFReportView.as_view(), name="drf-reports"),
    path("record/", views.record_in_transaction, name="record"),
    path("api/", include(router.urls)),
    path("", views.ok, name="home"),
]
