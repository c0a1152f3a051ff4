"""The one place where meter_django reads its settings: the ``METER`` dict.

Keys of ``METER``:

- the upper-case names of every :data:`meter_core.CLIENT_OPTIONS` entry (``KAFKA_URL``,
  ``PORTAL_URL``, ``API_KEY``, ``INTERNAL_URL``, ``TOPIC``, ``DEVICE_ID``, ``ENABLED``,
  ``TIMEOUT``, ``MAX_RETRIES``, ``BATCH_SIZE``, ``FLUSH_INTERVAL``, ``DURABLE``, ...). A
  key missing from ``METER`` falls back to its ``METER_*`` environment variable;
- the Django-only keys of :data:`DJANGO_DEFAULTS` (``RULES``, ``TENANT``, ``DEVICE``,
  ``METER_STATUSES``, ``STORE``, ``DATABASE``).

Every read looks ``settings.METER`` up at that moment, so ``override_settings`` works and
nothing is frozen at import. What is derived from it (client options, compiled rules,
resolvers) is cached and dropped when the ``METER`` setting changes (see ``signals``).
Misconfiguration is reported by the system checks (``checks``), never by a crash here:
the functions below raise :class:`meter_core.ConfigurationError`, which callers on the
request path log and swallow.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from django.conf import settings

from meter_core import (
    CLIENT_OPTIONS,
    ClientOption,
    ConfigurationError,
    MemoryFailureStore,
    MeterClient,
)

__all__ = [
    "DJANGO_DEFAULTS",
    "MeterSettings",
    "check_option",
    "client_option_keys",
    "conf",
    "option_from_env",
    "parse_statuses",
]

#: Django-only keys with their defaults.
DJANGO_DEFAULTS: Mapping[str, Any] = {
    # route template / view name (+ methods) -> meter(s); compiled with meter_core.RouteRules
    "RULES": {},
    # who is billed: {"user_attr": "tenant_id"}, a callable(request) or its dotted path,
    # or {"header": "X-Tenant-Id", "trusted": True}
    "TENANT": {"user_attr": "tenant_id"},
    # device of the events: None (DEVICE_ID), or the same shapes as TENANT
    "DEVICE": None,
    # response statuses that are metered
    "METER_STATUSES": range(200, 300),
    # where undelivered events go: "database" (FailedMeterEvent), "memory", or a
    # meter_core.FailureStore (or the dotted path of one, or of a zero-argument factory)
    "STORE": "database",
    # database alias of the FailedMeterEvent table
    "DATABASE": "default",
}

T = TypeVar("T")


def client_option_keys() -> dict[str, ClientOption]:
    """Client options by their ``METER`` key (``"KAFKA_URL"`` -> the kafka_url option)."""
    return {option.setting_name: option for option in CLIENT_OPTIONS.values()}


def _probe_kwargs(name: str) -> dict[str, Any]:
    """Options that let a throw-away client check the one option ``name`` alone."""
    kwargs: dict[str, Any] = {"transport": "memory", "enabled": False}
    if name == "transport":
        kwargs = {"kafka_url": "http://probe.invalid", "enabled": False}
    elif name == "enabled":
        del kwargs["enabled"]
    elif name == "durable":
        kwargs["failure_store"] = MemoryFailureStore(1)
    elif name == "backoff_cap":
        kwargs["backoff_base"] = 0.0
    elif name == "backoff_base":
        kwargs["backoff_cap"] = CLIENT_OPTIONS["backoff_cap"].maximum  # (the largest allowed)
    return kwargs


def check_option(option: ClientOption, value: Any) -> Any:
    """``value`` checked (and converted) as ``option`` by meter_core itself; raises
    ConfigurationError naming the option. Builds a client that does no I/O."""
    if option.name == "kafka_url" and value is None:
        return None
    client = MeterClient(**{**_probe_kwargs(option.name), option.name: value})
    return client.options[option.name]


def option_from_env(option: ClientOption, environ: Mapping[str, str]) -> Any:
    """The value of ``option`` parsed from its environment variable, as meter_core's
    ``MeterClient.from_env`` parses it. Raises ConfigurationError naming the variable."""
    assert option.env is not None
    client = MeterClient.from_env({option.env: environ[option.env]}, **_probe_kwargs(option.name))
    return client.options[option.name]


def parse_statuses(value: Any) -> frozenset[int]:
    """``METER["METER_STATUSES"]`` as a set of HTTP status codes; raises
    ConfigurationError for anything else (a string, a non-code, an empty collection)."""
    if isinstance(value, (str, bytes, Iterator)) or not isinstance(value, Iterable):
        # (an iterator, such as a generator or map(), would be used up by a first read)
        raise ConfigurationError(
            f"METER['METER_STATUSES']: must be a collection of status codes (a list, a "
            f"tuple, a set or a range), got {value!r}"
        )
    codes = list(value)
    bad = [c for c in codes if type(c) is not int or not 100 <= c <= 599]
    if bad or not codes:
        raise ConfigurationError(
            f"METER['METER_STATUSES']: must hold HTTP status codes (100-599), got {bad or codes!r}"
        )
    return frozenset(codes)


class MeterSettings:
    """Read access to ``settings.METER`` with defaults and a cache of derived values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}
        self._generation = 0  # bumped by clear(): a value built before it is not kept

    # -- raw access --------------------------------------------------------------------

    @property
    def raw(self) -> Any:
        """``settings.METER`` as given (``{}`` when unset); may be of any type."""
        return getattr(settings, "METER", {})

    def _mapping(self) -> Mapping[str, Any]:
        raw = self.raw
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"METER: must be a dict, got {type(raw).__name__}")
        return raw

    def get(self, key: str) -> Any:
        """A Django-only key, or its default."""
        return self._mapping().get(key, DJANGO_DEFAULTS[key])

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` once until the settings change. Errors are not cached, nor a value
        built from settings that changed while it was built."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]  # type: ignore[no-any-return]
            generation = self._generation
        value = build()
        with self._lock:
            if self._generation != generation:
                return value
            self._cache.setdefault(key, value)
            return self._cache[key]  # type: ignore[no-any-return]

    def clear(self) -> None:
        """Forget everything derived from the settings."""
        with self._lock:
            self._cache.clear()
            self._generation += 1

    # -- client options ----------------------------------------------------------------

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of the client: ``METER`` keys first, then ``METER_*``
        environment variables. Values are checked; raises ConfigurationError."""
        return dict(self.cached("client_options", self._build_client_options))

    def _build_client_options(self) -> dict[str, Any]:
        meter = self._mapping()
        options: dict[str, Any] = {}
        for key, option in client_option_keys().items():
            if key in meter:
                options[option.name] = meter[key]
            elif option.env_value(os.environ) is not None:
                options[option.name] = option_from_env(option, os.environ)
        return options

    def option(self, name: str) -> Any:
        """One client option as configured (METER, env, else meter_core's default), read
        alone: a bad value of another option does not affect it. Raises
        ConfigurationError only when this option's own environment variable is bad (or
        ``METER`` is not a dict). ``METER`` values are returned as given."""
        return self.cached(f"option:{name}", lambda: self._build_option(CLIENT_OPTIONS[name]))

    def _build_option(self, option: ClientOption) -> Any:
        meter = self._mapping()
        if option.setting_name in meter:
            return meter[option.setting_name]
        if option.env_value(os.environ) is not None:
            return option_from_env(option, os.environ)
        return option.default

    @property
    def enabled(self) -> bool:
        return bool(self.option("enabled"))

    @property
    def durable(self) -> bool:
        return bool(self.option("durable"))

    @property
    def allow_unknown_meters(self) -> bool:
        return bool(self.option("allow_unknown_meters"))

    @property
    def database(self) -> str:
        alias = self.get("DATABASE")
        if not isinstance(alias, str):
            raise ConfigurationError(f"METER['DATABASE']: must be a str, got {alias!r}")
        return alias


conf = MeterSettings()
