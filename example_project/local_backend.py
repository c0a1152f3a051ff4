"""Where the examples find the Litewave side when the environment names none: the local
backend that ``python -m meter_core devserver`` serves on its default port."""

from __future__ import annotations

import os

LOCAL_BACKEND_URL = "http://127.0.0.1:8787"


def litewave_urls() -> dict[str, str]:
    """``METER_KAFKA_URL`` and ``METER_INTERNAL_URL`` from the environment, each
    defaulting to the local backend. (``METER_PORTAL_URL`` / ``METER_API_KEY``, when set,
    are read by the client itself and switch the lookup to the portal.)"""
    return {
        "kafka_url": os.environ.get("METER_KAFKA_URL", LOCAL_BACKEND_URL),
        "internal_url": os.environ.get("METER_INTERNAL_URL", LOCAL_BACKEND_URL),
    }
