"""Where a request's tenant and device ids come from.

``MeterMiddleware(tenant=..., device=...)`` each take one of:

- a constant id (``"acme"``), checked when the middleware is built;
- a callable ``(scope) -> str | None``;
- a resolver made here: :func:`from_user`, :func:`from_state`, :func:`from_path_param`,
  :func:`from_header`.

Resolvers run after the app has handled the request (for a websocket session: when the
app accepts the connection), so they see what the app's routing and authentication put
in the scope (``scope["user"]``, ``request.state``, ``scope["path_params"]``). ``None``
or ``""`` means "no id": the request is not metered and is counted as untenanted.

A request header is the one source a client controls completely, so :func:`from_header`
refuses to build a resolver unless the app states that a gateway it runs sets (and
overwrites) that header: ``from_header("x-tenant-id", trusted=True)``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from meter_asgi.types import Scope
from meter_core import ConfigurationError, InvalidEvent, decode_header_value, validate_identifier

__all__ = ["Resolver", "from_header", "from_path_param", "from_state", "from_user"]

ResolverFunc = Callable[[Scope], Any]

# An HTTP header name is a token (RFC 9110, section 5.1); nothing else can match one.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Resolver:
    """A named ``(scope) -> str | None`` function; what :func:`from_user`,
    :func:`from_path_param` and :func:`from_header` return. Immutable and thread-safe.

    ``str``, ``int`` and ``uuid.UUID`` values become ``str``; a value of any other type
    raises ``TypeError`` (the middleware logs it and does not meter the request).
    """

    __slots__ = ("_func", "_why", "description")

    def __init__(
        self,
        func: ResolverFunc,
        description: str,
        why: Callable[[Scope], str] | None = None,
    ) -> None:
        self._func = func
        self._why = why
        self.description = description

    def __call__(self, scope: Scope) -> str | None:
        return _as_id(self._func(scope), self.description)

    def explain(self, scope: Scope) -> str:
        """Why this resolver finds no id in ``scope``, for a log line (only called
        then: it is not on the path of a request that has one)."""
        why = self._why(scope) if self._why is not None else "gave none"
        return f"{self.description}: {why}"

    def __repr__(self) -> str:
        return f"<Resolver {self.description}>"


def _as_id(value: object, source: str) -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"{source} gave {type(value).__name__} {value!r}, not an id (str)")


def _name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{what}: must be a non-empty str, got {value!r}")
    if not value.isprintable():
        # a newline or a tab (a name read from a file?) is refused, not dropped: spaces
        # at the ends are the one thing forgiven (and dropped)
        raise ConfigurationError(
            f"{what}: {value!r} has a character that is not printable (a newline, a tab, "
            "a control character)"
        )
    return value.strip()


def _attr_path(what: str, value: object) -> tuple[str, list[str]]:
    """A checked attribute path (``"user.tenant_id"``) and its steps: none empty,
    none with whitespace or a control character (no attribute can have such a name)."""
    path = _name(what, value)
    steps = path.split(".")
    for step in steps:
        if not step:
            raise ConfigurationError(f"{what}: {path!r} has an empty step")
        if any(c.isspace() for c in step):
            raise ConfigurationError(
                f"{what}: {path!r} has a step with a space in it: no attribute is named so"
            )
    return path, steps


def from_user(attr: str = "tenant_id") -> Resolver:
    """The id held by the authenticated user: ``scope["user"].<attr>`` (a mapping user
    is read with ``user[attr]``). ``None`` when there is no user, when the user's
    ``is_authenticated`` is false, or when it has no such attribute.

    A dotted ``attr`` follows attributes (or mapping keys) from the user, as meter_django's
    ``{"user_attr": ...}`` and :func:`from_state` do: ``from_user("org.tenant_id")`` reads
    ``scope["user"].org.tenant_id``. A user holding ``attr`` itself (a mapping of claims
    with a key ``"org.tenant_id"``) is read that way first, so such a name keeps working.

    ``scope["user"]`` is what Starlette's ``AuthenticationMiddleware`` (or any other
    middleware of the app) sets: an id the app has authenticated, which a client cannot
    choose. This is the default tenant source (``from_user("tenant_id")``).
    """
    attr, steps = _attr_path("from_user(attr)", attr)
    dotted = len(steps) > 1

    def resolve(scope: Scope) -> Any:
        user = scope.get("user")
        if user is None or not getattr(user, "is_authenticated", True):
            return None
        value = user.get(attr) if isinstance(user, Mapping) else getattr(user, attr, None)
        if value is None and dotted:
            value = _follow(user, steps)
        return value

    def why(scope: Scope) -> str:
        user = scope.get("user")
        if user is None:
            return (
                'the scope has no "user": no authentication middleware set one (or use '
                "from_state / a callable to take the tenant from elsewhere)"
            )
        kind = type(user).__name__
        if not getattr(user, "is_authenticated", True):
            return f"the user ({kind}) is not authenticated"
        holds_name = attr in user if isinstance(user, Mapping) else hasattr(user, attr)
        if dotted and not holds_name:  # (a user holding the dotted name is read so first)
            holder: Any = user
            for depth, step in enumerate(steps[:-1], 1):
                holder = _step(holder, step)
                if holder is None:
                    return f"the user ({kind}) has no {'.'.join(steps[:depth])!r}"
            kind = f"{kind}, at {'.'.join(steps[:-1])!r}"
            name = steps[-1]
            has = name in holder if isinstance(holder, Mapping) else hasattr(holder, name)
            return f"the user ({kind}) has {'an empty' if has else 'no'} {name!r}"
        return f"the user ({kind}) has {'an empty' if holds_name else 'no'} {attr!r}"

    return Resolver(resolve, f"from_user({attr!r})", why)


def from_state(attr: str) -> Resolver:
    """The id the app put on ``request.state`` while handling the request, as a FastAPI
    dependency or a Starlette middleware that authenticates the caller does
    (``request.state.tenant_id = ...``). A dotted ``attr`` follows attributes (or
    mapping keys) from there: ``from_state("user.tenant_id")`` reads
    ``request.state.user.tenant_id``. ``None`` when any step is missing.

    ``request.state`` is the scope's ``"state"`` dict (Starlette and FastAPI keep it
    there), which the middleware makes sure exists before the app runs. The app writes
    it, not the client: an id found there is as trustworthy as the code that set it.
    """
    attr, steps = _attr_path("from_state(attr)", attr)

    def resolve(scope: Scope) -> Any:
        return _follow(scope.get("state"), steps)

    return Resolver(resolve, f"from_state({attr!r})")


def _step(value: Any, step: str) -> Any:
    """``value``'s attribute (or mapping key) ``step``; None when it has none."""
    return value.get(step) if isinstance(value, Mapping) else getattr(value, step, None)


def _follow(value: Any, steps: list[str]) -> Any:
    """The value at the end of ``steps`` from ``value``; None when a step is missing."""
    for step in steps:
        if value is None:
            return None
        value = _step(value, step)
    return value


def from_path_param(name: str) -> Resolver:
    """The id in the path parameter ``name`` of the route the framework matched
    (``scope["path_params"]``, e.g. ``/tenants/{tenant_id}/scan``); ``None`` when absent.

    The client writes the path: use this only when the app itself refuses (with a non-2xx
    status, which is never metered) a caller who does not belong to that tenant.
    """
    name = _name("from_path_param(name)", name)
    if not name.isidentifier():
        raise ConfigurationError(
            f"from_path_param(name): {name!r} is not a path parameter name (a route's "
            "parameters are identifiers: 'tenant' for '/tenants/{tenant}' or "
            "'/tenants/{tenant:str}')"
        )

    def resolve(scope: Scope) -> Any:
        params = scope.get("path_params")
        return params.get(name) if params else None

    return Resolver(resolve, f"from_path_param({name!r})")


def from_header(name: str, *, trusted: bool = False) -> Resolver:
    """The id in request header ``name`` (case-insensitive); ``None`` when the header is
    missing, empty, or sent more than once with different values.

    Raises :class:`~meter_core.ConfigurationError` unless ``trusted=True``: any client can
    send any header, so a tenant header is only trustworthy when a gateway of the app's
    own sets it and drops the client's copy. Passing ``trusted=True`` states exactly that.
    """
    name = _name("from_header(name)", name)
    if not _HEADER_NAME.fullmatch(name):
        raise ConfigurationError(
            f"from_header(name): {name!r} is not a valid header name (letters, digits and "
            "!#$%&'*+-.^_`|~ only: no spaces, colons or control characters), so no "
            "request could ever carry it"
        )
    if trusted is not True:
        raise ConfigurationError(
            f"from_header({name!r}): a request header can be forged by any client, so it "
            "could bill another tenant; pass trusted=True only if a gateway you run sets "
            "this header and strips the client's copy (or use from_user / from_path_param)"
        )
    key = name.lower().encode("latin-1")

    def resolve(scope: Scope) -> Any:
        found: str | None = None
        for header, value in scope.get("headers", ()):
            if header == key:
                text = decode_header_value(value).strip()
                if found is not None and text != found:
                    return None  # ambiguous: which copy did the gateway set?
                found = text
        return found or None

    return Resolver(resolve, f"from_header({name!r}, trusted=True)")


def compile_resolver(option: str, value: object) -> tuple[str | None, Resolver | None]:
    """Compile a ``tenant=`` / ``device=`` option into ``(constant, resolver)``: exactly
    one is set, or neither for ``None``. A plain callable is wrapped in a :class:`Resolver`
    (so what it returns is type-checked like any resolver's). Raises ConfigurationError
    for anything else."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return check_id(option, value), None
    if isinstance(value, Resolver):
        return None, value
    if callable(value):
        name = getattr(value, "__qualname__", None) or repr(value)
        return None, Resolver(value, f"{option} callable {name}")
    raise ConfigurationError(
        f"{option}: must be an id (str), a callable (scope) -> str | None, or a resolver "
        f"(from_user, from_state, from_path_param, from_header), got {value!r}"
    )


def check_id(option: str, value: str) -> str:
    """``value`` if it is a valid tenant/device id, else ConfigurationError naming
    ``option``. Uses the same rules as every event (meter_core's validation)."""
    try:
        validate_identifier(option, value)
    except InvalidEvent as exc:
        message = str(exc).split(": ", 1)[-1]
        raise ConfigurationError(f"{option}: {value!r} is not a valid id: {message}") from None
    return value
