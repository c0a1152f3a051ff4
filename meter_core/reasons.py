"""Failure reasons of stored events, grouped for people to read.

A store keeps each event's last error as text, and texts about a customer lookup name
their tenant ("no customer account for tenant 't-17'"): counted by exact text, an
outage of the lookup API, or a batch of tenants without an account, gives a line per
tenant (102 lines in a drill). :func:`group_reasons` counts such texts together, with
the number of tenants they name; the stores' own ``counts()`` stay exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["group_reasons"]

# A tenant id as the errors quote it (repr: single quotes, or double when it holds one).
_QUOTED = r"(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
_TENANT = re.compile(rf"((?:for tenant|lookup of|lookup of tenant) )({_QUOTED})")
_CACHED = " (cached)"
# ... and as the lookup URL quotes it ("customer lookup of 't-1' at http://…/tenant/t-1")
_URL_TENANT = re.compile(r"(/customer-accounts/tenant/)[^\s/?#]+")


def group_reasons(by_reason: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """``{reason: (events, tenants)}``, most events first: the reasons of ``by_reason``
    (text -> events, as a store's ``counts()["by_reason"]``) with the tenant they name
    replaced by ``…`` and a ``(cached)`` mark dropped, with the number of tenants named
    by the texts each stands for (0 for a reason that names none)."""
    grouped: dict[str, tuple[list[int], set[str]]] = {}
    for reason, count in by_reason.items():
        tenants = [match.group(2) for match in _TENANT.finditer(reason)]
        key = _URL_TENANT.sub("\\1…", _TENANT.sub("\\1…", reason)).replace(_CACHED, "")
        events, named = grouped.setdefault(key, ([0], set()))
        events[0] += count
        named.update(tenants)
    ordered = sorted(grouped.items(), key=lambda item: -item[1][0][0])
    return {reason: (events[0], len(named)) for reason, (events, named) in ordered}
