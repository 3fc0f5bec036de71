"""Module-name patterns shared by the quantizer and the LoRA injector."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

# The attribute under which an adapter wrapper keeps the layer it adapts (PEFT's name too).
BASE_LAYER = "base_layer"


def logical_name(name: str) -> str:
    """The name a layer had before an adapter wrapped it, so patterns mean the same in either order."""
    suffix = "." + BASE_LAYER
    while name.endswith(suffix):
        name = name[: -len(suffix)]
    return name.replace(suffix + ".", ".")


def matches(name: str, pattern: str) -> bool:
    """True if `pattern` names module `name`: a glob over the whole name, or a dotted suffix of it."""
    name = logical_name(name)
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, pattern) for pattern in patterns)


def unmatched_patterns(names: Sequence[str], patterns: Iterable[str]) -> list[str]:
    """The patterns that name none of `names`: a typo here would silently change what is trained."""
    return [p for p in patterns if not any(matches(n, p) for n in names)]


def describe_names(names: Sequence[str], limit: int = 8) -> str:
    """A few names for an error message, so the user sees what does exist."""
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more if shown else "(none)"
