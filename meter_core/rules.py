"""Route rules: which requests are metered, with which meters and how much.

Both framework adapters compile their settings here, once, at start-up:

    rules = RouteRules({
        "POST /documents/{doc_id}/scan": "page.processed.basic",
        "/reports/{kind}": {"meter": "report.generated.small", "usage": 2},
        "GET /search": [MeterSpec("report.generated.dataquery", header="X-Meter-Usage")],
        "documents:export": "report.generated.large",        # a view name (Django)
    })

A key is an optional method list (``GET`` or ``GET,POST``, upper-case: ``"post /x"``
raises) and either a route template starting with ``/`` or a view name. A key without
methods applies to every method except ``HEAD`` and ``OPTIONS``: neither gives the caller
the route's result (a HEAD answer has no body; an OPTIONS one is a CORS preflight or a
probe, which a CORS middleware or Django's class-based views answer with a 200), so
uptime checks and preflights are not billed. Write ``"HEAD /x"`` or ``"OPTIONS /x"`` to
meter them.

Templates may be written in Starlette (``{id}``, ``{id:int}``) or Django (``<int:id>``)
syntax; both compile to the same form, so a rule matches the template a framework
resolved with one dict lookup (an unbalanced brace or an unnamed ``{}`` raises). For apps
without a router, :meth:`RouteRules.match_path` matches a concrete path against the
templates.

A value is a meter id, a dict ``{"meter", "usage", "header", "metadata", "session"}``,
a :class:`MeterSpec`, or a list of them (several meters per route). A usage header's
value is read with :func:`parse_usage_header`, the same way in every adapter.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Union

from meter_core.catalog import is_known_meter
from meter_core.errors import ConfigurationError, InvalidEvent
from meter_core.events import MAX_USAGE, validate_identifier

__all__ = [
    "METHODS_WITHOUT_RESULT",
    "MeterSpec",
    "RouteRules",
    "decode_header_value",
    "normalize_template",
    "parse_usage_header",
]

_PARAM = re.compile(r"\{[^{}]*\}|<[^<>]*>")
_BRACE_PARAM = re.compile(r"\{([^{}]*)\}")
_METHOD = re.compile(r"[A-Z]+")
# An HTTP header name (a token of RFC 9110): "X Meter Usage" could never be sent
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD_LIST_ANY_CASE = re.compile(r"[A-Za-z]+(?:,[A-Za-z]+)*")
# Method words a rule may name; only used to recognise one written in lower case.
_METHOD_WORDS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "WEBSOCKET"}
)
_MAX_USAGE_DIGITS = len(str(MAX_USAGE))
_EMPTY: Mapping[str, str] = MappingProxyType({})
_MAX_CACHED_METHODS = 32
METHODS_WITHOUT_RESULT: frozenset[str] = frozenset({"HEAD", "OPTIONS"})
"""HTTP methods whose answer gives the caller no result of the route (no body; a CORS
preflight or a probe). A rule without a method list, or an adapter's per-view
declaration, does not meter them; a rule that names one does."""


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """One meter to record for a matched request.

    ``usage`` is a constant int, or a callable the adapter calls after the response with
    its own arguments (documented by each adapter) returning an int (0 or None: nothing
    recorded). ``header`` takes the usage from a response header the app sets; the
    adapter removes that header before the response leaves. ``session`` marks an AI
    session meter of a websocket route (start event on connect, end event on close).
    """

    meter_id: str
    usage: int | Callable[..., Any] = 1
    header: str | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    session: bool = False

    def __post_init__(self) -> None:
        try:
            validate_identifier("meter_id", self.meter_id)
        except InvalidEvent as exc:
            raise ConfigurationError(f"meter rule: {exc}") from None
        usage = self.usage
        if not callable(usage) and (type(usage) is not int or not 0 <= usage <= MAX_USAGE):
            raise ConfigurationError(
                f"meter rule {self.meter_id!r}: usage must be an int from 0 to {MAX_USAGE} "
                f"or a callable, got {usage!r}"
            )
        if self.header is not None:
            if not isinstance(self.header, str) or not _HEADER_NAME.fullmatch(self.header.strip()):
                raise ConfigurationError(
                    f"meter rule {self.meter_id!r}: header must be an HTTP header name "
                    f"(letters, digits and !#$%&'*+-.^_`|~, no spaces), got {self.header!r}"
                )
            object.__setattr__(self, "header", self.header.strip().lower())
        if not isinstance(self.metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()
        ):
            raise ConfigurationError(f"meter rule {self.meter_id!r}: metadata must map str to str")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))


RuleValue = Union[  # noqa: UP007 (a runtime alias: X | Y of generics fails on 3.10)
    str, MeterSpec, Mapping[str, Any], Iterable[Union[str, MeterSpec, Mapping[str, Any]]]  # noqa: UP007
]


def normalize_template(template: str) -> str:
    """A route template with every parameter written ``{}`` and a leading ``/``:
    ``/documents/{doc_id}/scan``, ``documents/<int:doc_id>/scan`` -> ``/documents/{}/scan``."""
    template = template.strip()
    if not template.startswith("/"):
        template = "/" + template
    return _PARAM.sub("{}", template)


def decode_header_value(raw: bytes) -> str:
    """The text of a request header's value: UTF-8 when the bytes are valid UTF-8 (what
    gateways send for a non-ASCII id, and what the client sends in its own lookup
    header), else Latin-1, as HTTP/1.1 reads any byte. Both adapters read tenant and
    device headers this way (Django and Starlette give Latin-1 text: re-encode it)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_usage_header(header: str, value: str) -> int:
    """The usage a response header states. ``value`` must be ASCII digits only, with
    optional spaces or tabs around them (HTTP's optional whitespace), and at most
    ``MAX_USAGE`` (a signed 64-bit integer); leading zeros are fine.

    Anything else (``"2.5"``, ``"-1"``, ``"+3"``, ``"1_000"``, ``"abc"``, ``""``, a larger
    number) raises :class:`~meter_core.InvalidEvent` (field ``total_usage``) naming
    ``header`` and quoting ``value``; so does a ``value`` that is not a ``str`` at all
    (``None``: a header the response did not set). Both adapters read usage headers
    through this function, so they accept and refuse exactly the same strings."""
    text = value.strip(" \t") if isinstance(value, str) else ""
    if text.isascii() and text.isdigit():
        # Leading zeros stripped first: int() of a very long string raises ValueError.
        significant = text.lstrip("0")
        if len(significant) <= _MAX_USAGE_DIGITS:
            usage = int(significant) if significant else 0
            if usage <= MAX_USAGE:
                return usage
    raise InvalidEvent(
        "total_usage",
        f"response header {header!r} must be an int from 0 to {MAX_USAGE} (digits only), "
        f"got {value!r}",
    )


def _check_target(key: str, target: str) -> None:
    """Refuse a route template whose ``{...}`` parameters are unbalanced or unnamed."""
    for param in _BRACE_PARAM.finditer(target):
        if not param.group(1).split(":", 1)[0].strip():
            raise ConfigurationError(
                f"routes[{key!r}]: parameter {param.group(0)!r} of {target!r} has no name "
                "(write e.g. '{id}')"
            )
    rest = _BRACE_PARAM.sub("", target)
    if "{" in rest or "}" in rest:
        raise ConfigurationError(
            f"routes[{key!r}]: unbalanced brace in the route template {target!r} "
            "(a parameter is written '{name}')"
        )


def _template_regex(normalized: str, original: str) -> re.Pattern[str]:
    pieces = normalized.split("{}")
    params = _PARAM.findall(original if original.startswith("/") else "/" + original)
    out = []
    for i, piece in enumerate(pieces):
        out.append(re.escape(piece))
        if i < len(pieces) - 1:
            param = params[i] if i < len(params) else ""
            out.append(".+" if ":path" in param or param.startswith("<path:") else "[^/]+")
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True, slots=True)
class _Rule:
    methods: frozenset[str] | None
    target: str  # normalized template or view name
    meters: tuple[MeterSpec, ...]
    regex: re.Pattern[str] | None
    key: str  # as given


class RouteRules:
    """Compiled route rules. Immutable after construction; lookups are read-only and
    thread-safe. Bad rules raise :class:`~meter_core.ConfigurationError` naming the key."""

    def __init__(self, rules: Mapping[str, RuleValue], *, allow_unknown_meters: bool = False):
        if not isinstance(rules, Mapping):
            raise ConfigurationError(f"routes: must be a mapping of rule -> meter, got {rules!r}")
        self._by_target: dict[str, list[_Rule]] = {}
        # method -> {target: meters}, filled at first use of each method: a match is then
        # one dict lookup (requests of unusual methods are not cached, see _for_method)
        self._by_method: dict[str, dict[str, tuple[MeterSpec, ...]]] = {}
        self._path_rules: list[_Rule] = []
        self.has_header_usage = False
        self.has_sessions = False
        for key, value in rules.items():
            rule = self._compile(key, value, allow_unknown_meters)
            self._by_target.setdefault(rule.target, []).append(rule)
            if rule.regex is not None:
                self._path_rules.append(rule)
            for spec in rule.meters:
                self.has_header_usage |= spec.header is not None
                self.has_sessions |= spec.session
        self.header_names = frozenset(
            spec.header
            for rules_ in self._by_target.values()
            for rule in rules_
            for spec in rule.meters
            if spec.header is not None
        )

    def __bool__(self) -> bool:
        return bool(self._by_target)

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_target.values())

    @staticmethod
    def _compile(key: object, value: RuleValue, allow_unknown: bool) -> _Rule:
        if not isinstance(key, str) or not key.strip():
            raise ConfigurationError(f"routes: rule key must be a non-empty str, got {key!r}")
        parts = key.split(None, 1)
        methods: frozenset[str] | None = None
        target = key.strip()
        if len(parts) == 2 and all(_METHOD.fullmatch(m) for m in parts[0].split(",")):
            methods = frozenset(parts[0].split(","))
            target = parts[1].strip()
        elif (
            len(parts) == 2
            and _METHOD_LIST_ANY_CASE.fullmatch(parts[0])
            and set(parts[0].upper().split(",")) <= _METHOD_WORDS
        ):
            raise ConfigurationError(
                f"routes[{key!r}]: methods are upper-case: write "
                f"'{parts[0].upper()} {parts[1].strip()}'"
            )
        meters = tuple(_specs(key, value))
        if not meters:
            raise ConfigurationError(f"routes[{key!r}]: no meter given")
        for spec in meters:
            if not allow_unknown and not is_known_meter(spec.meter_id):
                raise ConfigurationError(
                    f"routes[{key!r}]: unknown meter {spec.meter_id!r} (register_meter() it, "
                    "or allow unknown meters)"
                )
        if target.startswith("/"):
            _check_target(key, target)
            normalized = normalize_template(target)
            return _Rule(methods, normalized, meters, _template_regex(normalized, target), key)
        return _Rule(methods, target, meters, None, key)

    def template_rules(self) -> list[tuple[str, str, frozenset[str] | None]]:
        """``(key, normalized template, methods)`` of each rule whose target is a route
        template (not a view name); methods None: the rule names none (every method but
        HEAD and OPTIONS). What a check for rules no route can match needs."""
        return [
            (rule.key, rule.target, rule.methods)
            for rules in self._by_target.values()
            for rule in rules
            if rule.regex is not None
        ]

    def match(self, method: str, target: str | None) -> tuple[MeterSpec, ...]:
        """Meters of the rules for ``target`` (a normalized route template or a view
        name) and ``method``; empty when none. One dict lookup when nothing matches."""
        if target is None:
            return ()
        table = self._by_method.get(method)
        if table is None:
            table = self._for_method(method)
        return table.get(target, ())

    def _for_method(self, method: str) -> dict[str, tuple[MeterSpec, ...]]:
        table = {}
        for target, rules in self._by_target.items():
            meters = _collect(rules, method)
            if meters:
                table[target] = meters
        # Any method word a client sends reaches here: keep the table bounded.
        if len(self._by_method) < _MAX_CACHED_METHODS:
            self._by_method[method] = table
        return table

    def match_route(self, method: str, template: str | None) -> tuple[MeterSpec, ...]:
        """Meters for a framework's route template in any supported syntax (None: the
        framework resolved no route). Django names its root URL's route ``""``: it is
        the template ``/``."""
        if template is None:
            return ()
        return self.match(method, normalize_template(template))

    def match_prefixed(self, method: str, prefix: str, template: str) -> tuple[MeterSpec, ...]:
        """Meters for a route ``template`` (normalized) that the framework matched after
        a concrete ``prefix`` of the path (a mount, an included router): first the whole
        as a literal template, then the rules made of the route's template after a part
        that fits the prefix (``/tenants/{t}/docs`` for ``/docs`` under
        ``/tenants/acme``). So a rule for another route, such as a catch-all
        ``/{rest:path}``, does not bill this one."""
        found = self.match(method, prefix + template)
        if found:
            return found
        matched = [
            r
            for r in self._path_rules
            if len(r.target) > len(template)
            and r.target.endswith(template)
            and _prefix_pattern(r.target[: len(r.target) - len(template)]).fullmatch(prefix)
        ]
        return _collect(matched, method) if matched else ()

    def match_path(self, method: str, path: str) -> tuple[MeterSpec, ...]:
        """Meters for a concrete request path (no router): first the path as a literal
        template, then each template's pattern in rule order."""
        found = self.match(method, path)
        if found:
            return found
        matched = [r for r in self._path_rules if r.regex is not None and r.regex.match(path)]
        return _collect(matched, method) if matched else ()


@functools.lru_cache(maxsize=1024)
def _prefix_pattern(leading: str) -> re.Pattern[str]:
    """A normalized template's leading part as a pattern of the concrete prefix it
    describes (each ``{}`` one path segment)."""
    return re.compile(
        "".join("[^/]+" if part == "{}" else re.escape(part) for part in _BRACES.split(leading))
    )


_BRACES = re.compile(r"(\{\})")


def _collect(rules: list[_Rule], method: str) -> tuple[MeterSpec, ...]:
    out: list[MeterSpec] = []
    implied = method not in METHODS_WITHOUT_RESULT
    for rule in rules:
        applies = implied if rule.methods is None else method in rule.methods
        if applies:
            out.extend(rule.meters)
    return tuple(out)


def _specs(key: str, value: Any) -> Iterable[MeterSpec]:
    if isinstance(value, (str, MeterSpec, Mapping)):
        yield _spec(key, value)
        return
    if isinstance(value, Iterable):
        for item in value:
            yield _spec(key, item)
        return
    raise ConfigurationError(
        f"routes[{key!r}]: expected a meter id, a spec or a list, got {value!r}"
    )


def _spec(key: str, value: Any) -> MeterSpec:
    if isinstance(value, MeterSpec):
        return value
    if isinstance(value, str):
        return MeterSpec(value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"meter", "usage", "header", "metadata", "session"}
        if unknown:
            raise ConfigurationError(f"routes[{key!r}]: unknown spec keys {sorted(unknown)}")
        if "meter" not in value:
            raise ConfigurationError(f"routes[{key!r}]: a spec needs a 'meter'")
        return MeterSpec(
            value["meter"],
            usage=value.get("usage", 1),
            header=value.get("header"),
            metadata=value.get("metadata") or _EMPTY,
            session=bool(value.get("session", False)),
        )
    raise ConfigurationError(f"routes[{key!r}]: expected a meter id or a spec, got {value!r}")
