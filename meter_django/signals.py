"""Reset what was derived from ``METER`` when the setting changes (``override_settings``,
pytest-django's ``settings`` fixture): cached options, rules, resolvers and the client."""

from __future__ import annotations

from typing import Any

from django.core.signals import setting_changed

__all__ = ["connect", "on_setting_changed"]


def on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting != "METER":
        return
    from meter_django.client import reset_client
    from meter_django.conf import conf

    conf.clear()
    reset_client()


def connect() -> None:
    setting_changed.connect(on_setting_changed, dispatch_uid="meter_django.settings")
