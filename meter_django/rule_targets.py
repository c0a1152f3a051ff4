"""Which ``METER["RULES"]`` keys can never match: the URLconf walked as the middleware
sees requests (``request.resolver_match.route`` and ``.view_name``), each rule key
compiled by meter_core's RouteRules, and advice for the usual mistakes (a trailing slash,
a template for a ``re_path()`` or DRF router route, a view name without its namespace).
Used by the system check ``meter_django.W003``."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meter_core import RouteRules

__all__ = ["unmatched_rules"]

# The key grammar of meter_core.RouteRules: optional upper-case methods, then the target.
_RULE_METHODS = re.compile(r"[A-Z]+(?:,[A-Z]+)*")


@dataclass(frozen=True)
class _Route:
    """One URL pattern as the middleware sees the requests it resolves."""

    route: str  # request.resolver_match.route
    view_name: str  # request.resolver_match.view_name
    regex: bool  # part of it is a regular expression (re_path(), DRF routers)


class _Probe:
    """Rule keys compiled by RouteRules, the middleware's own matcher, each under a marker
    meter id, to tell which of them a route template matches."""

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        """``entries``: (key to compile, rule key to answer); keys that do not compile
        are left out."""
        table: dict[str, list[str]] = {}
        self.answers: list[str] = []
        self.methods = {"GET"}  # what a rule without methods applies to
        for probe_key, rule_key in entries:
            try:
                RouteRules({probe_key: "probe"}, allow_unknown_meters=True)
            except Exception:
                continue
            table.setdefault(probe_key, []).append(str(len(self.answers)))
            self.answers.append(rule_key)
            methods = probe_key.split(None, 1)[0]
            if _RULE_METHODS.fullmatch(methods):
                self.methods.add(methods.split(",")[0])
        self.rules = RouteRules(table, allow_unknown_meters=True)

    def matching(self, template: str) -> set[str]:
        """The rule keys that match ``template`` (for the methods they name)."""
        return {
            self.answers[int(spec.meter_id)]
            for method in self.methods
            for spec in self.rules.match_route(method, template)
        }


def unmatched_rules(rules: Any, allow_unknown: bool) -> list[tuple[str, str]]:
    """``(message, advice)`` for each rule whose route template or view name no URL
    pattern has (system check W003). Never raises: with a URLconf that cannot be imported
    or walked it says nothing (Django's own URL checks report that)."""
    targets = list(_rule_targets(rules, allow_unknown))
    if not targets:
        return []
    routes = _urlconf_routes()
    if routes is None:
        return []
    rules_probe = _Probe((key, key) for key, _, target in targets if target.startswith("/"))
    # a view name with a "/" may be a route template that lost its leading slash
    slashless = _Probe(
        (_rule_key(methods, "/" + target), key)
        for key, methods, target in targets
        if not target.startswith("/") and "/" in target
    )
    matched: set[str] = set()
    misplaced: set[str] = set()
    near: dict[str, _Route] = {}  # a route the rule matches but for its trailing slash
    as_regex: dict[str, _Route] = {}  # a re_path() route the rule is written for
    for route in routes:
        matched |= rules_probe.matching(route.route)
        misplaced |= slashless.matching(route.route)
        shape = _shape(route)
        if not shape.strip("/"):
            continue
        for key in rules_probe.matching(_other_slash(shape)):
            near.setdefault(key, route)
        if route.regex:
            for key in rules_probe.matching(shape):
                as_regex.setdefault(key, route)
    names = {route.view_name for route in routes}
    out: list[tuple[str, str]] = []
    for key, methods, target in targets:
        if target.startswith("/"):
            if key in matched:
                continue
            what = f"no route of the URLconf is {target!r} (parameter names aside)"
            meant = as_regex.get(key) or near.get(key)
            advice = _template_advice(methods, target, meant, routes)
        else:
            if target in names:
                continue
            what = f"no URL pattern is named {target!r}"
            if key in misplaced:
                advice = (
                    f"A route template starts with '/': write {_rule_key(methods, '/' + target)!r}."
                )
            else:
                advice = _name_advice(methods, target, names)
        out.append(
            (
                f"METER['RULES'][{key!r}] never matches: {what}, so this usage is not metered.",
                advice,
            )
        )
    return out


def _rule_targets(rules: Any, allow_unknown: bool) -> Iterator[tuple[str, str, str]]:
    """``(key, methods, target)`` of each rule key that compiles (the others are E005)."""
    if not isinstance(rules, Mapping):
        return
    for key, value in rules.items():
        try:
            RouteRules({key: value}, allow_unknown_meters=allow_unknown)
        except Exception:
            continue
        parts = key.split(None, 1)
        if len(parts) == 2 and _RULE_METHODS.fullmatch(parts[0]):
            yield key, parts[0], parts[1].strip()
        else:
            yield key, "", key.strip()


def _urlconf_routes() -> list[_Route] | None:
    """Every URL pattern of ``ROOT_URLCONF``; None when it cannot be imported or walked."""
    from django.urls import get_resolver

    try:
        return list(_walk(get_resolver().url_patterns, "", (), regex=False))
    except Exception:
        return None


def _walk(
    patterns: Iterable[Any], prefix: str, namespaces: tuple[str, ...], *, regex: bool
) -> Iterator[_Route]:
    from django.urls import URLPattern, URLResolver
    from django.urls.resolvers import LocalePrefixPattern, RegexPattern

    for pattern in patterns:
        piece = str(pattern.pattern)
        # joined as URLResolver.resolve() joins resolver_match.route
        route = prefix + piece.removeprefix("^") if prefix else piece
        is_regex = regex or isinstance(pattern.pattern, RegexPattern)
        if isinstance(pattern, URLResolver):
            inner = (*namespaces, pattern.namespace) if pattern.namespace else namespaces
            if isinstance(pattern.pattern, LocalePrefixPattern) and piece:
                # i18n_patterns(): the middleware matches their routes without the
                # language prefix too, as urls.py writes them
                yield from _walk(pattern.url_patterns, prefix, inner, regex=is_regex)
            yield from _walk(pattern.url_patterns, route, inner, regex=is_regex)
        elif isinstance(pattern, URLPattern):
            name = pattern.name or _view_path(pattern.callback)
            yield _Route(route, ":".join((*namespaces, name)), is_regex)


def _view_path(view: Any) -> str:
    """The dotted path ResolverMatch names the view of an unnamed pattern by."""
    view = getattr(view, "view_class", view)
    if not hasattr(view, "__name__"):
        return f"{type(view).__module__}.{type(view).__name__}"
    return f"{view.__module__}.{view.__name__}"


def _rule_key(methods: str, target: str) -> str:
    return f"{methods} {target}" if methods else target


def _other_slash(template: str) -> str:
    return template[:-1] if template.endswith("/") else template + "/"


def _template_advice(methods: str, target: str, meant: _Route | None, routes: list[_Route]) -> str:
    """``meant``: a route the rule matches but for its trailing slash, or a re_path()
    route it is written for."""
    if meant is not None and not meant.regex:
        which = "without" if target.endswith("/") else "with"
        return (
            f"The URLconf has this route {which} the trailing slash: write "
            f"{_rule_key(methods, _other_slash(target))!r}."
        )
    if meant is None:
        shapes: dict[str, _Route] = {}
        for route in routes:
            shape = _shape(route)
            if shape.strip("/"):
                shapes.setdefault("/" + shape.removeprefix("/"), route)
        close = difflib.get_close_matches(target, list(shapes), n=1)
        if not close:
            return ""
        meant = shapes[close[0]]
    if meant.regex:
        return (
            f"The route {meant.route!r} is a regular expression (re_path(), e.g. of a DRF "
            "router), which a route template rule never matches: meter it by its view name, "
            f"{_rule_key(methods, meant.view_name)!r}."
        )
    return f"Did you mean {_rule_key(methods, '/' + meant.route)!r}?"


def _name_advice(methods: str, target: str, names: set[str]) -> str:
    close = sorted(name for name in names if name.endswith(f":{target}"))
    close = close or difflib.get_close_matches(target, sorted(names), n=1)
    return f"Did you mean {_rule_key(methods, close[0])!r}?" if close else ""


def _shape(route: _Route) -> str:
    return _regex_shape(route.route) if route.regex else route.route


def _regex_shape(route: str) -> str:
    """A regular-expression route written as a template, to tell which route a rule
    meant: ``api/vs-docs/(?P<pk>[^/.]+)/scan/$`` -> ``api/vs-docs/{}/scan/``. Groups,
    classes and ``\\d``-like escapes become parameters; anchors and quantifiers go."""
    out: list[str] = []
    i = 0
    while i < len(route):
        char = route[i]
        if char == "\\" and i + 1 < len(route):
            escaped = route[i + 1]
            if not escaped.isalnum():
                out.append(escaped)
            elif escaped not in "AZbB":
                out.append("{}")
            i += 2
        elif char in "([":
            i = _group_end(route, i)
            out.append("{}")
        elif char == "{":
            end = route.find("}", i)
            i = len(route) if end < 0 else end + 1
        elif char in "^$?*+":
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _group_end(route: str, start: int) -> int:
    """The index after the group or character class that opens at ``start``."""
    i = start + 1
    if route[start] == "[":
        i += route.startswith("^", i)
        i += route.startswith("]", i)
        while i < len(route) and route[i] != "]":
            i += 2 if route[i] == "\\" else 1
        return i + 1
    depth = 1
    while i < len(route) and depth:
        char = route[i]
        if char == "[":
            i = _group_end(route, i)
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        i += 2 if char == "\\" else 1
    return i
