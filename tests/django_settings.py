"""Django settings for the meter_django tests.

SQLite by default; ``METER_TEST_DB=postgres`` runs the same tests on the PostgreSQL
server at ``METER_TEST_PG_HOST`` (default 127.0.0.1:5432, user postgres, trust auth).
"""

from __future__ import annotations

import os
import tempfile

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.django_app.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "rest_framework",
    "rest_framework.authtoken",
    "meter_django",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "meter_django.middleware.MeterMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
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

if os.environ.get("METER_TEST_DB") == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("METER_TEST_PG_NAME", "postgres"),
            "USER": os.environ.get("METER_TEST_PG_USER", "postgres"),
            "HOST": os.environ.get("METER_TEST_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("METER_TEST_PG_PORT", "5432"),
        }
    }
else:
    # A file, not ":memory:": Django's in-memory test database uses SQLite's shared cache,
    # where a table another connection (the meter sender thread's) has locked fails at
    # once instead of waiting for the busy timeout as a file database, the one apps
    # run on, does.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": ":memory:",
            "TEST": {
                "NAME": os.path.join(
                    tempfile.gettempdir(), f"litewave-meter-tests-{os.getpid()}.sqlite3"
                )
            },
        }
    }

# The tests point the client at the local backend per test; this default keeps the app
# quiet (no network) wherever a test does not.
METER = {"ENABLED": False, "DEVICE_ID": "tests"}
