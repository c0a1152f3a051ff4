"""How counts read in log lines and command output: "1 usage event", "2 usage events"."""

from __future__ import annotations

__all__ = ["counted"]

_SINGULAR_VERBS = {"are": "is", "were": "was", "stay": "stays", "have": "has"}


def counted(count: int, noun: str, verb: str = "") -> str:
    """``count`` followed by ``noun`` (a plural ending in "s"), singular for one, and by
    ``verb`` (a plural form: "are", "were", "stay", "have") agreeing with it:
    ``counted(1, "usage events", "are")`` is ``"1 usage event is"``."""
    one = count == 1
    text = f"{count} {noun[:-1] if one and noun.endswith('s') else noun}"
    if verb:
        text += f" {_SINGULAR_VERBS.get(verb, verb) if one else verb}"
    return text
