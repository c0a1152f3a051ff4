"""Settings of the example Django site: SQLite, the admin, logged-in users who each belong
to a tenant, and meter_django pointed at the Litewave URLs of the environment (default:
the local backend, ``python -m meter_core devserver``)."""

from __future__ import annotations

import os
from pathlib import Path

from example_project.local_backend import litewave_urls

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "meter_django",
    "example_project.django_site.accounts",
    "example_project.django_site.documents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Meters the rules below, the @meter views and request.meter.add(...) usage, after
    # the view has answered with a 2xx.
    "meter_django.middleware.MeterMiddleware",
]

ROOT_URLCONF = "example_project.django_site.urls"
WSGI_APPLICATION = "example_project.django_site.wsgi.application"
ASGI_APPLICATION = "example_project.django_site.asgi.application"
AUTH_USER_MODEL = "accounts.User"
LOGIN_REDIRECT_URL = "/"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB_PATH", str(BASE_DIR / "db.sqlite3")),
    }
}

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_urls = litewave_urls()
METER = {
    "KAFKA_URL": _urls["kafka_url"],
    "INTERNAL_URL": _urls["internal_url"],
    "DEVICE_ID": os.environ.get("METER_DEVICE_ID", "django-example"),
    # Short delays so that the demo shows an outage within seconds; the defaults suit
    # production (see the README's settings table).
    "FLUSH_INTERVAL": 0.2,
    "MAX_RETRIES": 2,
    "BACKOFF_BASE": 0.1,
    "BACKOFF_CAP": 0.5,
    "TIMEOUT": 2.0,
    # Route templates as written in urls.py (or view names), with the method.
    "RULES": {
        "POST /documents/<int:doc_id>/scan/": "page.processed.advanced",
    },
    # Who is billed: the logged-in user's tenant_id (accounts.User).
    "TENANT": {"user_attr": "tenant_id"},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"meter": {"handlers": ["console"], "level": "WARNING"}},
}
