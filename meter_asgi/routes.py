"""Route rules for ASGI apps: compile the ``routes=`` option, and find the meters of a
request from the route template the framework resolved (or from its path).

Rule keys (compiled by :class:`meter_core.RouteRules`)::

    "POST /documents/{doc_id}/scan"      one method and a route template
    "GET,POST /reports/{kind}"           several methods
    "/search"                            any HTTP method but HEAD and OPTIONS
    "WEBSOCKET /ws/chat"                 a websocket route: AI session meters only

Templates are written as the app declares its routes (``{id}``, ``{id:int}``,
``{rest:path}``). A websocket rule's meters must all be session meters
(``{"meter": "chat.on.time_hours", "session": True}``), and a session meter may only sit
on a ``WEBSOCKET`` rule: everything else raises ConfigurationError naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meter_asgi.types import Scope
from meter_core import ConfigurationError, MeterSpec, RouteRules

__all__ = ["HTTP_METHODS", "WEBSOCKET", "RouteMatcher", "compile_routes"]

WEBSOCKET = "WEBSOCKET"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
_METHOD_WORD = re.compile(r"[A-Z]+(?:,[A-Z]+)*")
_PARAM = re.compile(r"\{([^{}]*)\}")
_MAX_CACHED_TEMPLATES = 4096
_MAX_METHODS_PER_ROUTE = 16  # any method word a client sends reaches the cache
_PATH_PARAM = re.compile(r"\{[^{}]*:path\}")


def compile_routes(routes: object, *, allow_unknown_meters: bool) -> RouteRules:
    """The compiled rules of the ``routes=`` option (a mapping, a RouteRules, or None).

    Raises ConfigurationError for anything :class:`~meter_core.RouteRules` refuses, an
    unknown method word, a key that is not a route template, and a misplaced session
    meter. A RouteRules given as is is used as is (its session meters still only ever
    apply to websockets, its other meters to HTTP requests).
    """
    if routes is None:
        return RouteRules({}, allow_unknown_meters=allow_unknown_meters)
    if isinstance(routes, RouteRules):
        return routes
    if not isinstance(routes, Mapping):
        raise ConfigurationError(f"routes: must be a mapping of rule -> meter, got {routes!r}")
    # A one-shot iterable value would be used up by RouteRules before our own checks.
    values = {key: _materialize(value) for key, value in routes.items()}
    rules = RouteRules(values, allow_unknown_meters=allow_unknown_meters)
    for key, value in values.items():
        _check_key(key, value)
    return rules


def _materialize(value: Any) -> Any:
    if isinstance(value, (str, MeterSpec, Mapping)) or not isinstance(value, Iterable):
        return value
    return list(value)


def _check_key(key: str, value: Any) -> None:
    parts = key.split(None, 1)
    methods: set[str] = set()
    target = key.strip()
    if len(parts) == 2 and _METHOD_WORD.fullmatch(parts[0]):
        methods = set(parts[0].split(","))
        target = parts[1].strip()
        unknown = methods - HTTP_METHODS - {WEBSOCKET}
        if unknown:
            raise ConfigurationError(
                f"routes[{key!r}]: unknown method {sorted(unknown)[0]!r} (one of "
                f"{', '.join(sorted(HTTP_METHODS))}, or {WEBSOCKET} for a websocket route)"
            )
    if not target.startswith("/"):
        raise ConfigurationError(
            f"routes[{key!r}]: {target!r} is not a route template (it must start with '/'; "
            "view names are for meter_django)"
        )
    specs = [value] if isinstance(value, (str, MeterSpec, Mapping)) else list(value)
    sessions = [_is_session(spec) for spec in specs]
    if WEBSOCKET in methods:
        if methods != {WEBSOCKET}:
            raise ConfigurationError(
                f"routes[{key!r}]: {WEBSOCKET} cannot be combined with HTTP methods"
            )
        if not all(sessions):
            raise ConfigurationError(
                f"routes[{key!r}]: a websocket rule takes session meters only "
                '({"meter": ..., "session": True})'
            )
        for spec in specs:
            if _header_of(spec) is not None:
                raise ConfigurationError(
                    f"routes[{key!r}]: a session meter has no response header usage"
                )
    elif any(sessions):
        raise ConfigurationError(
            f"routes[{key!r}]: a session meter must be on a websocket rule: '{WEBSOCKET} {target}'"
        )


def _is_session(spec: Any) -> bool:
    if isinstance(spec, MeterSpec):
        return spec.session
    if isinstance(spec, Mapping):
        return bool(spec.get("session", False))
    return False


def _header_of(spec: Any) -> Any:
    if isinstance(spec, MeterSpec):
        return spec.header
    if isinstance(spec, Mapping):
        return spec.get("header")
    return None


@dataclass(slots=True)
class _KnownRoute:
    route: object  # the framework's route object (kept: its id is the cache key)
    slashes: int  # "/" in its template, which has no {x:path} parameter
    normalized: str
    by_method: dict[str, tuple[MeterSpec, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Template:
    normalized: str  # every parameter written {}, as RouteRules keys its templates
    regex: re.Pattern[str]  # matches a concrete path the template describes
    path_names: tuple[str, ...] = ()  # names of its {x:path} parameters
    slashes: int = 0  # "/" in the template outside its parameters


def _compile_template(template: str) -> _Template:
    normalized: list[str] = []
    pattern: list[str] = []
    path_names: list[str] = []
    slashes = 0
    last = 0
    for param in _PARAM.finditer(template):
        literal = template[last : param.start()]
        normalized.append(literal)
        pattern.append(re.escape(literal))
        slashes += literal.count("/")
        normalized.append("{}")
        name, _, convertor = param.group(1).partition(":")
        if convertor == "path":
            path_names.append(name)
            pattern.append(".*")
        else:
            pattern.append("[^/]+")
        last = param.end()
    normalized.append(template[last:])
    pattern.append(re.escape(template[last:]))
    slashes += template[last:].count("/")
    return _Template("".join(normalized), re.compile("".join(pattern)), tuple(path_names), slashes)


def _path_template_start(path: str, compiled: _Template, scope: Scope) -> int:
    """Where in ``path`` a template with ``{x:path}`` parameters starts, -1 if unknown.

    Such a template fits after many prefixes (``/{rest:path}`` after any), so the
    prefix is not searched for: the values the framework matched its ``{x:path}``
    parameters to (``scope["path_params"]``, the path's own text) say how many slashes
    the part the template describes has (its other parameters match no slash), which
    puts its start on the path's slash that many from the end. Checked against the
    template; -1 without such values or when they do not fit the path."""
    params = scope.get("path_params")
    if not isinstance(params, dict):  # Starlette's (a dict check costs less than Mapping's)
        return -1
    slashes = compiled.slashes
    for name in compiled.path_names:
        value = params.get(name)
        if type(value) is not str:
            return -1
        slashes += value.count("/")
    start = len(path)
    for _ in range(slashes):
        start = path.rfind("/", 0, start)
        if start < 0:
            return -1
    return start if compiled.regex.fullmatch(path, start) is not None else -1


class RouteMatcher:
    """Finds the meters of a request once the app has routed it.

    Uses the route the framework put in ``scope["route"]`` (Starlette >= 0.33 and
    FastAPI set it inside the router, i.e. after this middleware was entered: call
    :meth:`specs` once the app has answered). Its template (``route.path``) is checked
    against the request path: when it describes the whole path, the meters are one dict
    lookup away; when it describes only the end of it (a route of a mounted app), the
    prefix the mounts added to ``root_path`` is kept as a concrete path in front of the
    template and matched with :meth:`RouteRules.match_prefixed` (without such a root_path,
    the prefix is the shortest one after which the template fits). A template with a
    ``{x:path}`` parameter fits after many prefixes (``/{rest:path}`` after any): its
    start comes from the values the framework matched that parameter to (see
    :func:`_path_template_start`), whatever root_path says. Without a route
    (older Starlette, a bare ASGI app, Django) the request path itself is matched
    against the templates.

    Compiled templates are cached per template string, and the answer for a route object
    that described the whole path is cached per route and method (both bounded): the
    next request routed to it costs a few dict lookups (see :meth:`_remember`). Reads are
    lock-free.
    """

    __slots__ = ("_mount_types", "_routes", "_rules", "_templates")

    def __init__(self, rules: RouteRules) -> None:
        self._rules = rules
        self._templates: dict[str, _Template] = {}
        self._mount_types: dict[type, bool] = {}  # route class -> stands for a sub-app
        self._routes: dict[int, _KnownRoute] = {}  # id(route) -> its template and meters

    def specs(self, method: str, scope: Scope, path: str, root_path: str) -> tuple[MeterSpec, ...]:
        """The meters for ``method`` on this request. ``path`` and ``root_path`` are the
        scope's values when the middleware was entered (a mount changes root_path)."""
        rules = self._rules
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        route = scope.get("route")
        if route is None:
            return rules.match_path(method, path)
        known = self._routes.get(id(route))
        if (
            known is not None
            and known.route is route
            and known.slashes == path.count("/")
            and scope.get("root_path", "") == root_path
        ):
            found = known.by_method.get(method)
            if found is None:
                found = rules.match(method, known.normalized)
                if len(known.by_method) < _MAX_METHODS_PER_ROUTE:
                    known.by_method[method] = found
            return found
        template = getattr(route, "path", None)
        if type(template) is str and template[:1] == "/" and not self._is_mount(route):
            compiled = self._templates.get(template)
            if compiled is None:
                compiled = _compile_template(template)
                if len(self._templates) < _MAX_CACHED_TEMPLATES:
                    self._templates[template] = compiled
            regex = compiled.regex
            if compiled.path_names:
                # A {x:path} template: its start is known from the parameters' values
                # (a FastAPI router included with a prefix: the route in the scope is
                # the router's own, without the prefix, and root_path is unchanged).
                start = _path_template_start(path, compiled, scope)
                if start == 0:
                    return rules.match(method, compiled.normalized)
                if start > 0:
                    return rules.match_prefixed(method, path[:start], compiled.normalized)
            # A route of a mounted app: Starlette's Mount has added its prefix to the
            # scope's root_path, which says exactly where the template starts (a
            # {rest:path} template would also describe the whole path).
            mounted = scope.get("root_path", "")
            if type(mounted) is str and len(mounted) > len(root_path):
                prefix = mounted[len(root_path) :] if mounted.startswith(root_path) else ""
                if prefix and path.startswith(prefix) and regex.fullmatch(path, len(prefix)):
                    return rules.match_prefixed(method, prefix, compiled.normalized)
            if regex.fullmatch(path) is not None:
                if mounted == root_path:
                    self._remember(route, template, compiled)
                return rules.match(method, compiled.normalized)
            # Otherwise (an app that does not keep root_path), the first place in the
            # path from which the template describes the rest of it.
            start = path.find("/", 1)
            while start > 0:
                if regex.fullmatch(path, start) is not None:
                    return rules.match_prefixed(method, path[:start], compiled.normalized)
                start = path.find("/", start + 1)
        return rules.match_path(method, path)

    def _remember(self, route: object, template: str, compiled: _Template) -> None:
        """Keep the route's normalized template for the next requests routed to it.

        Only a template without ``{x:path}`` parameters: it matches paths of exactly as
        many slashes as it has, so a later path with that many slashes, which the
        framework routed to this route, is described by the template as a whole (a
        prefix before it would add a slash). Such paths skip the regex."""
        if _PATH_PARAM.search(template) or len(self._routes) >= _MAX_CACHED_TEMPLATES:
            return
        # The route object itself is kept with its id: an id is only reused once the
        # object is gone, and this reference keeps it alive.
        self._routes[id(route)] = _KnownRoute(route, template.count("/"), compiled.normalized)

    def _is_mount(self, route: object) -> bool:
        """Whether the route stands for a whole sub-application (a Mount or a Host: it
        has ``.routes``), whose path is no template. Known once per route class."""
        kind = type(route)
        mount = self._mount_types.get(kind)
        if mount is None:
            mount = hasattr(route, "routes")
            if len(self._mount_types) < _MAX_CACHED_TEMPLATES:
                self._mount_types[kind] = mount
        return mount
