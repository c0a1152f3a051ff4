"""System checks of the ``METER`` setting, run by ``manage.py check`` (and before
``runserver`` / ``migrate``), so misconfiguration shows at deploy, not at a request.

==================  ===================================================================
id                  problem
==================  ===================================================================
meter_django.E001   ``METER`` is not a dict
meter_django.E002   ``METER`` has an unknown key
meter_django.E003   a client option (``METER`` key or ``METER_*`` variable) has a wrong
                    type or value
meter_django.E004   ``KAFKA_URL`` is missing while metering is enabled over HTTP
meter_django.E005   ``RULES`` cannot be compiled
meter_django.E006   ``TENANT`` or ``DEVICE`` cannot be used
meter_django.E007   ``TENANT`` or ``DEVICE`` reads a request header not marked trusted
                    (clients can forge headers)
meter_django.E008   ``METER_STATUSES`` is not a collection of HTTP status codes
meter_django.E009   ``STORE`` is not usable, or ``DATABASE`` is not a database alias, or
                    the database routers do not migrate FailedMeterEvent on it
meter_django.E010   the client cannot be built from these settings
meter_django.E011   no device id while metering is enabled: neither ``DEVICE_ID`` (nor
                    ``METER_DEVICE_ID``) nor a ``DEVICE`` resolver
meter_django.E012   ``@meter`` was given a meter id that is not in the catalog (unknown
                    meters not allowed); seen for the views the URLconf imports
meter_django.E013   a ``RULES`` value has ``"session": True``, which only websocket routes
                    of meter_asgi use
meter_django.E014   ``MeterMiddleware`` is listed more than once in ``MIDDLEWARE`` (the
                    first one meters; the others pass requests through)
meter_django.W001   only one of ``PORTAL_URL`` / ``API_KEY`` is set (the internal lookup
                    is used); not given when either value is wrong (E003)
meter_django.W002   ``RULES`` are set but ``MeterMiddleware`` is not in ``MIDDLEWARE``
meter_django.W003   a ``RULES`` key matches no route template or view name of the
                    URLconf (e.g. a missing trailing slash, or a template for a
                    re_path() / DRF router route), so it never meters
meter_django.W005   a ``RULES`` key names a method that is not an HTTP method (a typo such
                    as ``POTS``): that rule would meter nothing
meter_django.W004   ``TENANT`` reads an attribute of ``request.user`` that the user model
                    has not (no field, property or relation of that name), or, past a
                    relation, that the related model has not: no request would be
                    metered, unless each object gets it at run time
==================  ===================================================================

Messages name the key and what was given, never the API key's value.

W003 sees the URLconf as the middleware does: each route as ``request.resolver_match.route``
gives it (the ``path()`` / ``re_path()`` strings of the includes joined), matched against
the rules by :class:`meter_core.RouteRules` itself, and each view name as
``resolver_match.view_name`` (``namespace:name``). Routes are read in the language active
when the check runs (a translated route or an ``i18n_patterns`` prefix in another language
is not seen), and ``request.urlconf`` set by a middleware is not followed.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning

from meter_core import CLIENT_OPTIONS, METERS, ConfigurationError, RouteRules, is_known_meter
from meter_django.conf import (
    DJANGO_DEFAULTS,
    check_option,
    client_option_keys,
    option_from_env,
    parse_statuses,
)
from meter_django.rule_targets import unmatched_rules

__all__ = ["CHECKS", "check_settings"]

#: Every check id with its hint: the one registry of ids.
CHECKS: Mapping[str, str] = {
    "E001": "Set METER to a dict, e.g. {'KAFKA_URL': 'https://...', 'DEVICE_ID': 'web'}.",
    "E002": "Remove the key or fix its spelling; keys are listed in meter_django.conf.",
    "E003": "Fix the value; see meter_core.CLIENT_OPTIONS for each option's type.",
    "E004": "Set METER['KAFKA_URL'] (or METER_KAFKA_URL), or METER['ENABLED'] = False, "
    "or METER['TRANSPORT'] = 'log' for development.",
    "E005": "Fix METER['RULES']: keys like 'POST /documents/<int:pk>/scan/' or "
    "'app:view-name', values a meter id, a dict or a list of them.",
    "E006": "Use {'user_attr': 'tenant_id'}, a callable(request) or its dotted path, or "
    "{'header': 'X-Tenant-Id', 'trusted': True}.",
    "E007": "Only read a header a trusted proxy sets (and strips from clients); then add "
    "'trusted': True. Otherwise resolve the tenant from request.user.",
    "E008": "Use a list or range of ints, e.g. range(200, 300).",
    "E009": "Use STORE 'database', 'memory' or a meter_core.FailureStore; DATABASE must be "
    "a key of DATABASES.",
    "E010": "Fix the option the message names.",
    "E011": "Set METER['DEVICE_ID'] (e.g. 'web'), or the METER_DEVICE_ID environment "
    "variable, or METER['DEVICE'] to resolve it per request (the shapes of TENANT).",
    "E012": "Fix the meter id; a meter of your own must be registered with "
    "meter_core.register_meter() before the check runs (e.g. in the module of the view or "
    "in AppConfig.ready()), or set METER['ALLOW_UNKNOWN_METERS'] = True.",
    "E013": "Remove 'session'. Django metering is per request; record AI sessions with "
    "meter_django.record_session(start_time=...) and record_session(end_time=...).",
    "E014": "Keep one entry (after AuthenticationMiddleware): the first one meters every "
    "request, and the others pass requests through.",
    "W001": "Set both PORTAL_URL and API_KEY for the external lookup, or neither.",
    "W002": "Add 'meter_django.middleware.MeterMiddleware' to MIDDLEWARE.",
    "W003": "A rule matches a route template exactly as urls.py writes it, trailing slash "
    "included (parameter names and converters do not matter), or a view name "
    "'namespace:name'; routes of re_path() and DRF routers only by their view name.",
    "W005": "A rule with a method list meters only requests of those methods: fix the "
    "word, or silence this with SILENCED_SYSTEM_CHECKS for a method of your own.",
    "W004": "Give the user model that field or property, point 'user_attr' at one it has "
    "(a dotted path such as 'profile.tenant_id'), or use a callable. If an authentication "
    "backend sets it on each user, silence this with SILENCED_SYSTEM_CHECKS.",
}

_MIDDLEWARE = "meter_django.middleware.MeterMiddleware"


def _error(code: str, msg: str) -> Error:
    return Error(msg, hint=CHECKS[code], id=f"meter_django.{code}")


def _warning(code: str, msg: str, advice: str = "") -> Warning:
    hint = f"{advice} {CHECKS[code]}" if advice else CHECKS[code]
    return Warning(msg, hint=hint, id=f"meter_django.{code}")


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """All checks of ``METER``; registered by the app config."""
    meter = getattr(settings, "METER", {})
    if not isinstance(meter, Mapping):
        return [_error("E001", f"METER must be a dict, got {type(meter).__name__}.")]
    messages: list[CheckMessage] = []
    messages += _check_keys(meter)
    options, option_errors = _check_options(meter)
    messages += option_errors
    messages += _check_django_keys(meter, options)
    messages += _check_decorated_meters(bool(options.get("allow_unknown_meters")))
    if not messages:
        messages += _check_client()
    # after the client check: a warning here must not hide an E010
    unmatched = unmatched_rules(
        meter.get("RULES", DJANGO_DEFAULTS["RULES"]), bool(options.get("allow_unknown_meters"))
    )
    messages += [_warning("W003", msg, advice) for msg, advice in unmatched]
    return messages


def _check_keys(meter: Mapping[str, Any]) -> list[CheckMessage]:
    known = set(client_option_keys()) | set(DJANGO_DEFAULTS)
    out: list[CheckMessage] = []
    for key in meter:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        out.append(_error("E002", f"METER has an unknown key {key!r}.{suggestion}"))
    return out


def _set_but_blank(variable: str) -> str:
    """A note for a message about a missing value whose variable is set, but blank
    (which counts as unset)."""
    value = os.environ.get(variable)
    if value is None or value.strip():
        return ""
    return f" ({variable} is set, but empty: an empty variable counts as unset.)"


def _check_options(meter: Mapping[str, Any]) -> tuple[dict[str, Any], list[CheckMessage]]:
    options: dict[str, Any] = {}
    bad: set[str] = set()
    out: list[CheckMessage] = []
    for key, option in client_option_keys().items():
        try:
            if key in meter:
                options[option.name] = check_option(option, meter[key])
            elif option.env_value(os.environ) is not None:
                options[option.name] = option_from_env(option, os.environ)
        except ConfigurationError as exc:
            bad.add(option.name)
            out.append(_error("E003", f"{_source(meter, option.name)}: {exc}"))
    enabled = options.get("enabled", True)
    transport = options.get("transport", "http")
    kafka_given = (
        meter.get("KAFKA_URL") is not None
        or CLIENT_OPTIONS["kafka_url"].env_value(os.environ) is not None
    )
    if enabled and transport == "http" and not kafka_given:
        out.append(
            _error(
                "E004",
                "METER['KAFKA_URL'] is required while metering is enabled over HTTP."
                + _set_but_blank("METER_KAFKA_URL"),
            )
        )
    device_given = (
        meter["DEVICE_ID"] is not None
        if "DEVICE_ID" in meter
        else CLIENT_OPTIONS["device_id"].env_value(os.environ) is not None
    )
    if enabled and not device_given and meter.get("DEVICE") is None:
        out.append(
            _error(
                "E011",
                "No device id is configured while metering is enabled: usage recorded "
                "without a device_id is not sent." + _set_but_blank("METER_DEVICE_ID"),
            )
        )
    lookup = [name for name in ("portal_url", "api_key") if options.get(name)]
    if len(lookup) == 1 and not bad & {"portal_url", "api_key"}:
        given, missing = lookup[0], ({"portal_url", "api_key"} - set(lookup)).pop()
        out.append(
            _warning(
                "W001",
                f"Only {given.upper()} is set (by {_source(meter, given)}), not "
                f"{missing.upper()}: customer lookups use the internal URL.",
            )
        )
    return options, out


def _source(meter: Mapping[str, Any], name: str) -> str:
    """Where the client option ``name`` is read from: its METER key, else its variable."""
    option = CLIENT_OPTIONS[name]
    if option.setting_name in meter:
        return f"METER[{option.setting_name!r}]"
    return f"the environment variable {option.env}"


def _check_django_keys(meter: Mapping[str, Any], options: dict[str, Any]) -> list[CheckMessage]:
    from meter_django.client import build_store
    from meter_django.resolvers import build_resolver

    out: list[CheckMessage] = []
    rules = meter.get("RULES", DJANGO_DEFAULTS["RULES"])
    try:
        compiled = RouteRules(rules, allow_unknown_meters=bool(options.get("allow_unknown_meters")))
    except ConfigurationError as exc:
        out.append(_error("E005", f"METER['RULES']: {exc}"))
    else:
        out += [
            _error("E013", f"METER['RULES'][{key!r}]: 'session': True has no meaning in Django.")
            for key, value in rules.items()
            if RouteRules({key: value}, allow_unknown_meters=True).has_sessions
        ]
        if compiled and _MIDDLEWARE not in getattr(settings, "MIDDLEWARE", []):
            out.append(_warning("W002", f"METER['RULES'] are set but {_MIDDLEWARE} is not."))
        out += _check_rule_methods(rules)
    listed = list(getattr(settings, "MIDDLEWARE", None) or []).count(_MIDDLEWARE)
    if listed > 1:
        out.append(_error("E014", f"{_MIDDLEWARE} is listed {listed} times in MIDDLEWARE."))
    for key in ("TENANT", "DEVICE"):
        config = meter.get(key, DJANGO_DEFAULTS[key])
        if key == "TENANT" and config is None:
            out.append(_error("E006", "METER['TENANT'] must not be None."))
            continue
        try:
            build_resolver(key, config)
        except ConfigurationError as exc:
            code = "E007" if "not marked trusted" in str(exc) else "E006"
            out.append(_error(code, str(exc)))
        else:
            out += _check_user_attr(key, config)
    out += _check_statuses(meter.get("METER_STATUSES", DJANGO_DEFAULTS["METER_STATUSES"]))
    alias = meter.get("DATABASE", DJANGO_DEFAULTS["DATABASE"])
    if not isinstance(alias, str) or alias not in settings.DATABASES:
        out.append(_error("E009", f"METER['DATABASE'] is not a database alias: {alias!r}."))
    elif "failure_store" not in options:
        store = meter.get("STORE", DJANGO_DEFAULTS["STORE"])
        try:
            build_store(store, alias)
        except ConfigurationError as exc:
            out.append(_error("E009", str(exc)))
        else:
            if store == "database":
                out += _check_table_database(alias)
    return out


# The methods of the IANA registry that servers route (WebDAV's included): a rule naming
# another word is most likely a typo ("POTS"), which would meter nothing.
_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
     "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH",
     "QUERY", "LINK", "UNLINK", "PURGE"}
)  # fmt: skip
_METHOD_LIST = re.compile(r"[A-Z]+(?:,[A-Z]+)*")


def _check_rule_methods(rules: Mapping[str, Any]) -> list[CheckMessage]:
    """W005: a rule names a method word that no HTTP client sends (a typo)."""
    out: list[CheckMessage] = []
    for key in rules:
        parts = key.split(None, 1)
        if len(parts) != 2 or not _METHOD_LIST.fullmatch(parts[0]):
            continue
        for method in sorted(set(parts[0].split(",")) - _HTTP_METHODS):
            close = difflib.get_close_matches(method, sorted(_HTTP_METHODS), n=1)
            advice = f"Did you mean {close[0]!r}?" if close else ""
            msg = f"METER['RULES'][{key!r}]: {method!r} is not an HTTP method."
            out.append(_warning("W005", msg, advice))
    return out


def _check_user_attr(key: str, config: Any) -> list[CheckMessage]:
    """W004: a step of a ``user_attr`` path is not an attribute of the model it is read
    on: the user model for the first step, then the model each relation field leads to
    (a foreign key, a one-to-one, either way). A step that is not a relation field (a
    property, a plain attribute) ends the walk: what it returns is not known here."""
    if not isinstance(config, Mapping) or not isinstance(config.get("user_attr"), str):
        return []
    from django.apps import apps

    if not apps.is_installed("django.contrib.auth"):
        return []
    from django.contrib.auth import get_user_model

    try:
        model: Any = get_user_model()
    except Exception:  # (a broken AUTH_USER_MODEL is Django's own check to report)
        return []
    path = config["user_attr"]
    steps = path.split(".")
    for depth, step in enumerate(steps):
        if not hasattr(model, step):
            where = f"the user model {model._meta.label}"
            if depth:
                where = f"{model._meta.label} (request.user.{'.'.join(steps[:depth])})"
            return [
                _warning(
                    "W004",
                    f"METER[{key!r}] reads request.user.{path}, but {where} has no "
                    f"{step!r}: no request would be metered.",
                )
            ]
        model = _related_model(model, step)
        if model is None:
            return []
    return []


def _related_model(model: Any, name: str) -> Any:
    """The model that the single-valued relation field ``name`` of ``model`` leads to;
    None when ``name`` is no such field (a property, a plain field, a many-valued one)."""
    from django.core.exceptions import FieldDoesNotExist

    try:
        field = model._meta.get_field(name)
    except (FieldDoesNotExist, AttributeError):
        return None
    if not field.is_relation or field.many_to_many or field.one_to_many:
        return None
    related = field.related_model
    return related if isinstance(related, type) else None


def _check_table_database(alias: str) -> list[CheckMessage]:
    """The FailedMeterEvent table is read and written on ``alias`` with ``using()``,
    whatever the database routers say (so none is needed); but a router that keeps the
    table from being migrated there leaves the store without a table."""
    from django.db import router

    from meter_django.models import FailedMeterEvent

    if router.allow_migrate_model(alias, FailedMeterEvent):
        return []
    return [
        _error(
            "E009",
            f"METER['DATABASE'] is {alias!r}, but the database routers do not migrate "
            f"meter_django's FailedMeterEvent there (allow_migrate): the table of undelivered "
            "events would not exist where they are stored. Set METER['DATABASE'] to the "
            "alias the routers give meter_django.",
        )
    ]


def _check_decorated_meters(allow_unknown: bool) -> list[CheckMessage]:
    if allow_unknown:
        return []
    from meter_django.decorators import declared_meters

    # importing the URLconf imports (and so decorates) its views; one that cannot be
    # imported is reported by Django's own URL check
    with contextlib.suppress(Exception):
        importlib.import_module(settings.ROOT_URLCONF)
    out: list[CheckMessage] = []
    for meter_id, views in sorted(declared_meters().items()):
        if is_known_meter(meter_id):
            continue
        where = f" on {', '.join(views)}" if views else ""
        close = difflib.get_close_matches(meter_id, sorted(METERS), n=1)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        out.append(_error("E012", f"@meter({meter_id!r}){where}: unknown meter id.{suggestion}"))
    return out


def _check_statuses(value: Any) -> list[CheckMessage]:
    try:
        parse_statuses(value)
    except ConfigurationError as exc:
        return [_error("E008", str(exc))]
    return []


def _check_client() -> list[CheckMessage]:
    from meter_django.client import build_client
    from meter_django.conf import conf

    conf.clear()
    try:
        build_client()
    except ConfigurationError as exc:
        return [_error("E010", f"The meter client cannot be built: {exc}")]
    return []
