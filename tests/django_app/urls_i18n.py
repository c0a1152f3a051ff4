"""URLs with i18n_patterns() (used with override_settings(ROOT_URLCONF=...))."""

from __future__ import annotations

from django.conf.urls.i18n import i18n_patterns
from django.urls import path

from tests.django_app import views

urlpatterns = [
    path("en/legacy/", views.ok, name="legacy"),  # starts like a language prefix; is none
    *i18n_patterns(path("page/", views.ok, name="page")),
]
