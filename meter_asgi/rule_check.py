"""Which route rules no route of the app can match: a typo, a missing prefix or trailing
slash, or a method the route does not accept would otherwise leave a route unbilled
without a word.

Read at lifespan startup from the router under the middleware (Starlette's and FastAPI's
``routes``, reached through the ``app`` attribute of the middleware between them), with
mounts' prefixes put in front of their routes' templates. A bare ASGI app has no such
router: nothing is checked then. Routes under a mounted app that lists no routes of its
own (static files, a bare ASGI app) cannot be seen, so rules under its prefix are not
checked either.

A rule naming methods is also checked against the methods of the routes with its
template (``route.methods``: Starlette adds HEAD to GET routes, FastAPI does not): a
``GET`` rule on a POST-only route never meters, since the framework answers 405. A
``WEBSOCKET`` rule needs a route that is not a plain HTTP route. A route of a kind not
known here (no ``methods``) is taken to accept anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meter_core import RouteRules, normalize_template

__all__ = ["unmatched_rules"]

_MAX_DEPTH = 64  # middleware layers between us and the router (a cycle must not hang us)
_WEBSOCKET_ONLY = frozenset({"WEBSOCKET"})
_WITHOUT_RESULT = frozenset({"HEAD", "OPTIONS"})  # what a rule without methods leaves out


@dataclass
class _Routes:
    """The routes of one normalized template: how the app writes it (the first seen), the
    HTTP methods they accept, and whether one accepts any method (``methods`` None) or is
    of a kind not known here (a websocket route, say: it has no ``methods``)."""

    written: str
    methods: set[str] = field(default_factory=set)
    any_method: bool = False
    other_kind: bool = False

    def add(self, route: Any) -> None:
        if not hasattr(route, "methods"):
            self.other_kind = True
            return
        methods = route.methods
        if methods is None:
            self.any_method = True
        else:
            self.methods.update(str(method).upper() for method in methods)

    def refuses(self, methods: frozenset[str] | None) -> str | None:
        """Why a rule for ``methods`` never meters on these routes; None when it can."""
        accepted = "any method" if self.any_method else ", ".join(sorted(self.methods))
        if methods == _WEBSOCKET_ONLY:
            return None if self.other_kind else f"is not a websocket route (it accepts {accepted})"
        if self.any_method or self.other_kind:
            return None
        if methods is None:
            if self.methods - _WITHOUT_RESULT:
                return None
            return f"accepts {accepted} only, which a rule without methods does not meter"
        if methods & self.methods:
            return None
        return f"does not accept {', '.join(sorted(methods))} (it accepts {accepted})"


def unmatched_rules(app: Any, rules: RouteRules) -> list[str] | None:
    """A message for each template rule of ``rules`` that matches no route of the app
    under ``app``; None when no router can be found there (nothing to check)."""
    routes = _router_routes(app)
    if routes is None:
        return None
    templates: dict[str, _Routes] = {}  # normalized -> its routes
    opaque: list[str] = []  # prefixes of mounted apps that list no routes
    _walk(routes, "", templates, opaque)
    messages = []
    for key, target, methods in rules.template_rules():
        found = templates.get(target)
        if found is not None:
            why = found.refuses(methods)
            if why is not None:
                messages.append(
                    f"routes rule {key!r} never meters: the route {found.written!r} {why}"
                )
            continue
        if any(target == prefix or target.startswith(prefix + "/") for prefix in opaque):
            continue
        close = difflib.get_close_matches(target, list(templates), n=1, cutoff=0.6)
        hint = f"; did you mean {templates[close[0]].written!r}?" if close else ""
        messages.append(
            f"routes rule {key!r} matches no route of the app, so it never meters{hint}"
        )
    return messages


def _router_routes(app: Any) -> list[Any] | None:
    node = app
    for _ in range(_MAX_DEPTH):
        routes = getattr(node, "routes", None)
        if isinstance(routes, list):
            return routes
        node = getattr(node, "app", None)
        if node is None:
            return None
    return None


def _walk(
    routes: Iterable[Any], prefix: str, templates: dict[str, _Routes], opaque: list[str]
) -> None:
    for route in routes:
        path = getattr(route, "path", None)
        children = getattr(route, "routes", None)
        included = _included_router(route)
        if included is not None:  # FastAPI's router included with a prefix, kept whole
            _walk(included[1], prefix + included[0], templates, opaque)
        elif children is not None and hasattr(route, "app"):  # a Mount, or a Host (no path)
            inner = prefix + path if isinstance(path, str) else prefix
            if children:
                _walk(children, inner, templates, opaque)
            else:
                opaque.append(normalize_template(inner) if inner else "")
        elif isinstance(path, str):
            full = prefix + path
            templates.setdefault(normalize_template(full), _Routes(full)).add(route)
        else:  # a route of a kind not known here: it may serve any path
            opaque.append(normalize_template(prefix) if prefix else "")


def _included_router(route: Any) -> tuple[str, list[Any]] | None:
    """``(prefix, routes)`` of a router FastAPI includes as one entry of the app's routes
    (newer versions keep the router and its include prefix instead of copying its routes
    with the prefix); None for any other route."""
    context = getattr(route, "include_context", None)
    prefix = getattr(context, "prefix", None)
    routes = getattr(getattr(route, "original_router", None), "routes", None)
    if isinstance(prefix, str) and isinstance(routes, list):
        return prefix, routes
    return None
