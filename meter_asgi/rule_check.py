"""Which route rules no route of the app can match: a typo, a missing prefix or trailing
slash would otherwise leave a route unbilled without a word.

Read at lifespan startup from the router under the middleware (Starlette's and FastAPI's
``routes``, reached through the ``app`` attribute of the middleware between them), with
mounts' prefixes put in front of their routes' templates. A bare ASGI app has no such
router: nothing is checked then. Routes under a mounted app that lists no routes of its
own (static files, a bare ASGI app) cannot be seen, so rules under its prefix are not
checked either.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from meter_core import RouteRules, normalize_template

__all__ = ["unmatched_rules"]

_MAX_DEPTH = 64  # middleware layers between us and the router (a cycle must not hang us)


def unmatched_rules(app: Any, rules: RouteRules) -> list[str] | None:
    """A message for each template rule of ``rules`` that matches no route of the app
    under ``app``; None when no router can be found there (nothing to check)."""
    routes = _router_routes(app)
    if routes is None:
        return None
    templates: dict[str, str] = {}  # normalized -> as the app writes it
    opaque: list[str] = []  # prefixes of mounted apps that list no routes
    _walk(routes, "", templates, opaque)
    messages = []
    for key, target in rules.template_rules():
        if target in templates or any(
            target == prefix or target.startswith(prefix + "/") for prefix in opaque
        ):
            continue
        close = difflib.get_close_matches(target, list(templates), n=1, cutoff=0.6)
        hint = f"; did you mean {templates[close[0]]!r}?" if close else ""
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


def _walk(routes: Iterable[Any], prefix: str, templates: dict[str, str], opaque: list[str]) -> None:
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
            templates.setdefault(normalize_template(full), full)
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
