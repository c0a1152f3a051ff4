"""Signal receivers of the app.

- ``setting_changed``: reset what was derived from ``METER`` when the setting changes
  (``override_settings``, pytest-django's ``settings`` fixture): cached options, rules,
  resolvers and the client.
- ``connection_created`` for a connection without a database (alias ``NO_DB_ALIAS``):
  Django opens one only to create or drop a database, which is what its test runner (and
  pytest-django) does around a test run, right after closing its own connections. The
  client is reset then: its sender thread stops polling the database and closes its
  connection, or PostgreSQL refuses to drop the test database ("is being accessed by
  other users") and the sender goes on polling a database that no longer exists.
"""

from __future__ import annotations

from typing import Any

from django.core.signals import setting_changed
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.signals import connection_created

__all__ = ["connect", "on_database_maintenance", "on_setting_changed"]


def on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting != "METER":
        return
    from meter_django.client import reset_client
    from meter_django.conf import conf

    conf.clear()
    reset_client()


def on_database_maintenance(*, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    if connection.alias != NO_DB_ALIAS:
        return
    from django.db import connections

    from meter_django.client import reset_client

    # Closing the client may write to the store from this thread (events it still held):
    # a connection of this thread that was closed (the runner closed it before dropping
    # the database) is closed again afterwards.
    closed = [c for c in connections.all(initialized_only=True) if c.connection is None]
    reset_client()
    for conn in closed:
        if conn.connection is not None and not conn.in_atomic_block:
            conn.close()


def connect() -> None:
    setting_changed.connect(on_setting_changed, dispatch_uid="meter_django.settings")
    connection_created.connect(
        on_database_maintenance, dispatch_uid="meter_django.database_maintenance"
    )
