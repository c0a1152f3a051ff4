"""The Django app config: registers the system checks and the settings-change hook.

Nothing here touches the network or builds the client: start-up works with the
metering backend down or misconfigured.
"""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class MeterDjangoConfig(AppConfig):
    name = "meter_django"
    label = "meter_django"
    verbose_name = "Metering"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from meter_django import signals
        from meter_django.checks import check_settings

        checks.register(check_settings, "meter_django")
        signals.connect()
