"""Who is billed for a request (``METER["TENANT"]``) and from which device
(``METER["DEVICE"]``).

A resolver is built from one of these configurations:

- ``{"user_attr": "tenant_id"}``: an attribute of ``request.user`` (a dotted path such
  as ``"profile.tenant_id"`` follows relations); anonymous users have none;
- a callable ``(request) -> str | None`` or its dotted import path;
- ``{"header": "X-Tenant-Id", "trusted": True}``: a request header. Any client can send
  any header, so this is only accepted when explicitly marked trusted (a gateway in front
  of the app sets it and strips the client's own); an untrusted header configuration is
  a system check error and resolves nothing.

Resolvers run after the view (so a user authenticated during the view, e.g. by DRF's
``TokenAuthentication``, is seen). A non-string answer is converted with ``str()``;
``None`` or ``""`` means "unknown".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.http import HttpRequest
from django.utils.module_loading import import_string

from meter_core import ConfigurationError, decode_header_value

__all__ = ["Resolver", "build_resolver", "device_resolver", "tenant_resolver", "why_no_tenant"]

Resolver = Callable[[HttpRequest], "str | None"]

_KEYS = {"user_attr", "header", "trusted"}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text or None


def _user_attr(path: str) -> Resolver:
    parts = path.split(".")

    def resolve(request: HttpRequest) -> str | None:
        user = getattr(request, "user", None)
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        value: Any = user
        for part in parts:
            value = getattr(value, part, None)
            if value is None:
                return None
        return _text(value)

    return resolve


def why_no_tenant(request: HttpRequest, config: Any) -> str:
    """Why ``METER["TENANT"]`` (``config``) found no tenant for ``request``, for a log
    line: which step of a ``user_attr`` path was missing, or which setting to look at."""
    if isinstance(config, Mapping) and isinstance(config.get("user_attr"), str):
        path = config["user_attr"]
        user = getattr(request, "user", None)
        if user is None:
            return "the request has no user (is AuthenticationMiddleware installed?)"
        if not getattr(user, "is_authenticated", False):
            return f"the user is not authenticated ({type(user).__name__})"
        value: Any = user
        for part in path.split("."):
            owner = type(value).__name__
            value = getattr(value, part, None)
            if value is None:
                return f"{owner} has no {part!r} (METER['TENANT'] = {{'user_attr': {path!r}}})"
        return f"request.user.{path} is empty"
    if isinstance(config, Mapping) and "header" in config:
        return f"no {config['header']!r} header (METER['TENANT'])"
    return "METER['TENANT'] gave none"


def _header(name: str) -> Resolver:
    def resolve(request: HttpRequest) -> str | None:
        value = request.headers.get(name)
        if isinstance(value, str) and not value.isascii():
            # (Django gives the bytes as Latin-1 text: a gateway's UTF-8 id read as such)
            value = decode_header_value(value.encode("latin-1", "replace"))
        return _text(value)

    return resolve


def _callable(func: Callable[[HttpRequest], Any]) -> Resolver:
    def resolve(request: HttpRequest) -> str | None:
        return _text(func(request))

    return resolve


def build_resolver(key: str, config: Any) -> Resolver | None:
    """The resolver for ``METER[key]``; None for a ``None`` configuration. Raises
    ConfigurationError (naming ``key``) for anything else it cannot use."""
    label = f"METER[{key!r}]"
    if config is None:
        return None
    if isinstance(config, str):
        try:
            config = import_string(config)
        except ImportError as exc:
            raise ConfigurationError(f"{label}: cannot import {config!r}: {exc}") from None
        if not callable(config):
            raise ConfigurationError(f"{label}: {config!r} is not callable")
    if callable(config):
        return _callable(config)
    if not isinstance(config, Mapping):
        raise ConfigurationError(
            f"{label}: must be a dict, a callable or its dotted path, got {config!r}"
        )
    unknown = set(config) - _KEYS
    if unknown:
        raise ConfigurationError(f"{label}: unknown keys {sorted(unknown)}")
    if ("user_attr" in config) == ("header" in config):
        raise ConfigurationError(f"{label}: give exactly one of 'user_attr' or 'header'")
    if "user_attr" in config:
        attr = config["user_attr"]
        if not isinstance(attr, str) or not attr or not all(attr.split(".")):
            raise ConfigurationError(
                f"{label}: 'user_attr' must be an attribute name, got {attr!r}"
            )
        return _user_attr(attr)
    header = config["header"]
    if not isinstance(header, str) or not header.strip():
        raise ConfigurationError(f"{label}: 'header' must be a header name, got {header!r}")
    if config.get("trusted") is not True:
        raise ConfigurationError(
            f"{label}: the header {header!r} is not marked trusted. Clients can forge "
            "request headers and bill another tenant; use it only when a trusted proxy "
            "sets it, and say so with 'trusted': True"
        )
    return _header(header.strip())


def tenant_resolver() -> Resolver:
    """The configured tenant resolver (cached until the settings change)."""
    from meter_django.conf import conf

    def build() -> Resolver:
        resolver = build_resolver("TENANT", conf.get("TENANT"))
        if resolver is None:
            raise ConfigurationError("METER['TENANT']: must not be None")
        return resolver

    return conf.cached("tenant_resolver", build)


def device_resolver() -> Resolver | None:
    """The configured device resolver, or None (events use ``DEVICE_ID``)."""
    from meter_django.conf import conf

    return conf.cached("device_resolver", lambda: build_resolver("DEVICE", conf.get("DEVICE")))
