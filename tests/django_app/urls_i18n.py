"""URLs with i18n_patterns() (used with override_settings(ROOT_URLCONF=...))."""

from __future__ import annotations

from django.conf.urls.i18n import i18n_patterns
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.utils import translation

from tests.django_app import views


def switches_language(request: HttpRequest) -> HttpResponse:
    """Renders something in another language (an e-mail, say) and stays in it."""
    translation.activate("fr" if request.LANGUAGE_CODE == "en" else "en")
    return HttpResponse("ok")


urlpatterns = [
    path("en/legacy/", views.ok, name="legacy"),  # starts like a language prefix; is none
    *i18n_patterns(
        path("page/", views.ok, name="page"),
        path("switch/", switches_language, name="switch"),
    ),
]
