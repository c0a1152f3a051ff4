"""Client options: one registry of every option, its type, default and environment variable.

``MeterClient``, ``MeterClient.from_env()`` and the framework adapters (Django's ``METER``
setting and its system checks) all read the same :data:`CLIENT_OPTIONS`, so an option is
declared once. Values are checked here and a bad one raises
:class:`~meter_core.ConfigurationError` naming the option and the value (never a secret).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from meter_core.errors import ConfigurationError

__all__ = [
    "CLIENT_OPTIONS",
    "DEFAULT_INTERNAL_URL",
    "ClientOption",
    "Secret",
    "check_secret_text",
    "coerce_option",
    "options_from_env",
    "redact_url",
    "validate_url",
]

DEFAULT_INTERNAL_URL = "http://metering.metering.svc.cluster.local:8000"


class Secret:
    """Holds a secret (the API key) so that it never shows in a repr, str or log line.

    Only :meth:`reveal` returns the value; it is called where the Authorization header is
    built and nowhere else.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret: the value must be a str, got {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


def redact_url(url: object) -> str:
    """``url`` with what could hold a secret replaced by ``***``: everything between the
    scheme and the last ``@`` (user:password, however malformed), every query value and
    the fragment. Over-redacts rather than risk showing a key."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL>"
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    rest, hashed, _ = rest.partition("#")
    rest, asked, query = rest.partition("?")
    if asked:
        pairs = parse_qsl(query, keep_blank_values=True)
        rest += "?" + "&".join(f"{quote(k, safe='')}=***" for k, _ in pairs)
    return f"{scheme}://{rest}" + ("#***" if hashed else "")


def validate_url(name: str, value: object) -> str:
    """An http(s) URL with a host and no query or fragment (paths are appended to it),
    returned without its trailing slash.

    Raises :class:`ConfigurationError` naming ``name``. The message shows the URL
    redacted (:func:`redact_url`), and does not show a value that is not a URL at all:
    it may be the API key given in the wrong place.
    """
    if not isinstance(value, str) or not value.strip():
        shown = repr(value) if value is None or value == "" else type(value).__name__
        raise ConfigurationError(f"{name}: a URL is required, got {shown}")
    url = value.strip()
    if "://" not in url:
        raise ConfigurationError(
            f"{name}: URL must start with http:// or https:// (got a value of {len(url)} "
            "characters that is not a URL: the value is not shown, it could be a secret)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a malformed port
    except ValueError:
        raise ConfigurationError(f"{name}: malformed URL {redact_url(url)!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError(
            f"{name}: URL must start with http:// or https://, got {redact_url(url)!r}"
        )
    if not parts.hostname:
        raise ConfigurationError(f"{name}: URL has no host: {redact_url(url)!r}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigurationError(
            f"{name}: URL must not have a query or a fragment (paths are added to it), "
            f"got {redact_url(url)!r}"
        )
    del port
    return url.rstrip("/")


def check_secret_text(label: str, value: str) -> None:
    """Refuse an API key that cannot go into an HTTP header as it is: the HTTP library
    would refuse it later with an error that quotes it. The message never shows it."""
    if value != value.strip() or not value.isprintable():
        raise ConfigurationError(
            f"{label}: must not contain whitespace at its ends or control characters "
            "(a newline read from a secret file?)"
        )
    if not value.isascii():
        raise ConfigurationError(
            f"{label}: must be ASCII (a character such as an en dash or a non-breaking "
            "space pasted into the key?)"
        )


@dataclass(frozen=True, slots=True)
class ClientOption:
    """One option of :class:`~meter_core.MeterClient`.

    ``kind`` is ``"url"``, ``"str"``, ``"secret"``, ``"int"``, ``"float"``, ``"bool"`` or
    ``"object"`` (not settable from the environment). ``minimum`` and ``maximum`` bound
    numbers (durations: a day at most, or a year for cache lifetimes, so that no time
    computed from them overflows).
    """

    name: str
    kind: str
    default: Any
    env: str | None
    help: str
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None

    @property
    def setting_name(self) -> str:
        """The upper-case key used in framework settings (Django's ``METER`` dict)."""
        return self.name.upper()

    def env_value(self, environ: Mapping[str, str]) -> str | None:
        """The value of this option's variable in ``environ``; None when the option has
        none, or it is unset, empty or blank. An empty value counts as unset: that is
        what a deployment template gives for a value it does not have
        (``METER_DEVICE_ID: ${DEVICE_ID}`` in a compose file), where a refusal would stop
        the app at start-up. ``METER_ENABLED=`` turned metering off before: a billing
        switch left empty by a template no longer stops billing without a word (to turn
        it off, ``METER_ENABLED=false``)."""
        if self.env is None:
            return None
        value = environ.get(self.env)
        return value if value is not None and value.strip() else None


_OPTIONS: tuple[ClientOption, ...] = (
    ClientOption("kafka_url", "url", None, "METER_KAFKA_URL",
                 "Base URL of the Kafka REST Proxy (v2). Required."),
    ClientOption("portal_url", "url", None, "METER_PORTAL_URL",
                 "Portal base URL for the external customer lookup (with api_key).",
                 nullable=True),
    ClientOption("api_key", "secret", None, "METER_API_KEY",
                 "Bearer token of the external customer lookup.", nullable=True),
    ClientOption("internal_url", "url", DEFAULT_INTERNAL_URL, "METER_INTERNAL_URL",
                 "In-cluster metering service, used when portal_url/api_key are not both set."),
    ClientOption("topic", "str", "usage-events", "METER_TOPIC", "Kafka topic of usage events."),
    ClientOption("device_id", "str", None, "METER_DEVICE_ID",
                 "Default device id for events recorded without one.", nullable=True),
    ClientOption("timeout", "float", 10.0, "METER_TIMEOUT",
                 "Seconds to wait to connect and for each read of an answer; a whole "
                 "try of a request, its answer read, is cut off after twice that.",
                 minimum=0.001, maximum=86_400),
    ClientOption("customer_cache_ttl", "float", 300.0, "METER_CUSTOMER_CACHE_TTL",
                 "Seconds a customer lookup is cached.", minimum=0, maximum=31_536_000),
    ClientOption("negative_cache_ttl", "float", 30.0, "METER_NEGATIVE_CACHE_TTL",
                 "Seconds a 'no account for this tenant' answer is cached.", minimum=0,
                 maximum=31_536_000),
    ClientOption("allow_unknown_meters", "bool", False, "METER_ALLOW_UNKNOWN_METERS",
                 "Accept meter ids that are not in the catalog."),
    ClientOption("batch_size", "int", 500, "METER_BATCH_SIZE",
                 "Most records in one produce request.", minimum=1),
    ClientOption("max_batch_bytes", "int", 1024 * 1024, "METER_MAX_BATCH_BYTES",
                 "Most bytes in one produce request body.", minimum=1024),
    ClientOption("flush_interval", "float", 0.5, "METER_FLUSH_INTERVAL",
                 "Seconds the sender waits to fill a batch.", minimum=0.001, maximum=86_400),
    ClientOption("max_queue", "int", 100_000, "METER_MAX_QUEUE",
                 "Most events held in memory awaiting delivery.", minimum=1),
    ClientOption("max_retries", "int", 5, "METER_MAX_RETRIES",
                 "Retries of a retriable failure before the event goes to the store.",
                 minimum=0),
    ClientOption("backoff_base", "float", 0.5, "METER_BACKOFF_BASE",
                 "First retry delay bound in seconds (full jitter).", minimum=0, maximum=86_400),
    ClientOption("backoff_cap", "float", 30.0, "METER_BACKOFF_CAP",
                 "Largest retry delay in seconds.", minimum=0, maximum=86_400),
    ClientOption("durable", "bool", False, "METER_DURABLE",
                 "Write each event to the failure store before record() returns."),
    ClientOption("spool_path", "str", None, "METER_SPOOL_PATH",
                 "Path of a SQLite spool used as failure store.", nullable=True),
    ClientOption("transport", "str", "http", "METER_TRANSPORT",
                 "'http' (default), 'memory', 'log', or a Transport object."),
    ClientOption("max_failed_in_memory", "int", 10_000, "METER_MAX_FAILED_IN_MEMORY",
                 "Failed events kept in memory when no failure store is set.", minimum=0),
    ClientOption("enabled", "bool", True, "METER_ENABLED",
                 "False: validate and capture events, send nothing (development, tests)."),
    ClientOption("failure_store", "object", None, None,
                 "A FailureStore (e.g. SQLiteSpool) for events that could not be delivered.",
                 nullable=True),
    ClientOption("before_send", "object", None, None,
                 "Callable(event) -> event | None applied to every recorded event.",
                 nullable=True),
    ClientOption("on_error", "object", None, None,
                 "Callable(events, exc) called when events fail for good.", nullable=True),
)  # fmt: skip

#: Every client option by name. Adapters derive their settings from it.
CLIENT_OPTIONS: Mapping[str, ClientOption] = {opt.name: opt for opt in _OPTIONS}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce_option(
    option: ClientOption, value: Any, *, source: str | None = None, parse_strings: bool = False
) -> Any:
    """Check ``value`` for ``option`` and return it in its proper type.

    With ``parse_strings`` (values from the environment) strings are parsed for numbers
    and booleans, and text options other than ``device_id`` lose the whitespace at their
    ends; otherwise values must already have the right type. Raises
    :class:`ConfigurationError` naming the option (or ``source``, e.g. the variable).
    """
    label = source or option.name
    if value is None:
        if option.nullable or option.kind == "object":
            return None
        if option.default is not None:
            raise ConfigurationError(
                f"{label}: must not be None (leave it out for the default, {option.default!r})"
            )
        raise ConfigurationError(f"{label}: is required")
    kind = option.kind
    if kind == "url":
        return validate_url(label, value)
    if kind == "secret":
        if isinstance(value, Secret):
            text = value.reveal()
            if text:
                check_secret_text(label, text)
            return value if text else None
        if not isinstance(value, str):
            raise ConfigurationError(f"{label}: must be a str, got {type(value).__name__}")
        if value:
            check_secret_text(label, value)
        return Secret(value) if value else None
    if kind == "str":
        if option.name == "transport" and not isinstance(value, str):
            return value  # a Transport object; checked by the client
        if not isinstance(value, str):
            raise ConfigurationError(f"{label}: must be a str, got {value!r}")
        if parse_strings and option.name != "device_id":
            # (an env file's "METER_TOPIC=usage-events " would name another topic; an id
            # is billed data, kept exactly as given)
            return value.strip()
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if parse_strings and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigurationError(f"{label}: must be a bool, got {value!r}")
    if kind in ("int", "float"):
        number: float
        if parse_strings and isinstance(value, str):
            try:
                number = int(value) if kind == "int" else float(value)
            except (ValueError, OverflowError):
                raise ConfigurationError(f"{label}: must be a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"{label}: must be a number, got {value!r}")
        elif kind == "int" and not isinstance(value, int):
            raise ConfigurationError(f"{label}: must be an int, got {value!r}")
        else:
            number = value
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigurationError(f"{label}: must be finite, got {value!r}")
        if option.minimum is not None and number < option.minimum:
            raise ConfigurationError(f"{label}: must be >= {option.minimum:g}, got {value!r}")
        if option.maximum is not None and number > option.maximum:
            raise ConfigurationError(f"{label}: must be <= {option.maximum:g}, got {value!r}")
        return int(number) if kind == "int" else float(number)
    return value


def options_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Client keyword arguments from the ``METER_*`` variables set in ``environ`` (one
    set to an empty or blank value counts as unset: see :meth:`ClientOption.env_value`)."""
    options: dict[str, Any] = {}
    for option in _OPTIONS:
        value = option.env_value(environ)
        if value is not None:
            options[option.name] = coerce_option(
                option, value, source=option.env, parse_strings=True
            )
    return options
