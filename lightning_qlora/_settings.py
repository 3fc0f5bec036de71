"""Checks shared by the settings dataclasses and the constructors built on them.

Each check takes the exact type (a bool is not a number, a float is not an int, a string is not a bool),
refuses inf and NaN, and says in one line which setting was wrong, what it got and what is allowed. Keyword
arguments become a config through `config_from`, so the dataclass stays the one place defaults live.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import MISSING, fields, replace
from typing import Any, TypeVar

C = TypeVar("C")


class SettingTypeError(TypeError, ValueError):
    """A setting has the wrong type (a string where a number goes, 64.0 for an integer, 'no' for a bool).

    Also a ValueError, so code that catches bad settings as ValueError keeps catching these.
    """


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(owner: str, name: str, value: object) -> bool:
    """`value` itself if it is True or False; 'no', 0 or 1 are refused rather than read as truthy."""
    if not isinstance(value, bool):
        raise SettingTypeError(f"{owner} {name} must be True or False, got {_got(value)}.")
    return value


def check_int(
    owner: str, name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An int (not a bool, not a float such as 64.0) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingTypeError(f"{owner} {name} must be an integer, got {_got(value)}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f">= {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{owner} {name} must be {' and '.join(p for p in (low, high) if p)}, got {value}.")
    return value


def check_number(
    owner: str,
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """A finite int or float (not a bool, not a string) within the given bounds; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingTypeError(f"{owner} {name} must be a number, got {_got(value)}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{owner} {name} must be a finite number, got {value!r}.")
    below = minimum is not None and (number <= minimum if min_open else number < minimum)
    above = maximum is not None and (number >= maximum if max_open else number > maximum)
    if below or above:
        raise ValueError(
            f"{owner} {name} must be {describe_range(minimum, maximum, min_open, max_open)}, got {value!r}."
        )
    return number


def describe_range(
    minimum: float | None, maximum: float | None, min_open: bool = False, max_open: bool = False
) -> str:
    """'in [0, 1)', '> 0', '>= 0' ..., as the error messages say it."""
    if minimum is not None and maximum is not None:
        return f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{'>' if min_open else '>='} {minimum:g}"
    if maximum is not None:
        return f"{'<' if max_open else '<='} {maximum:g}"
    return "a number"


def check_choice(owner: str, name: str, value: object, choices: Collection[str]) -> str:
    """One of `choices` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {name} {value!r} for {owner}; allowed: {', '.join(choices)}.")
    return value


def check_patterns(owner: str, name: str, value: object) -> tuple[str, ...]:
    """A string or a sequence of strings (module-name patterns) as a tuple; None is the empty tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence):
        raise SettingTypeError(f"{owner} {name} must be a string or a list of strings, got {_got(value)}.")
    bad = [item for item in value if not isinstance(item, str)]
    if bad:
        raise SettingTypeError(f"{owner} {name} must hold strings only, got {', '.join(map(_got, bad))}.")
    return tuple(value)


def check_mapping(owner: str, name: str, value: object) -> dict[str, Any]:
    """A mapping with string keys, as a plain dict (a Hydra DictConfig included)."""
    if not isinstance(value, Mapping):
        raise SettingTypeError(f"{owner} {name} must be a mapping, got {_got(value)}.")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise SettingTypeError(f"{owner} {name} keys must be strings, got {', '.join(map(_got, bad))}.")
    return dict(value)


def config_from(
    cls: type[C],
    config: C | None,
    overrides: Mapping[str, Any],
    owner: str,
    own_arguments: Sequence[str] = (),
) -> C:
    """`config` (or `cls()`) with `overrides` applied: how `LoRA(r=8)` becomes `LoRAConfig(r=8)`.

    Keyword arguments that are not fields of `cls` are refused with the list of those that are, so a typo
    never goes unnoticed; the dataclass checks the values.
    """
    if config is not None and not isinstance(config, cls):
        raise SettingTypeError(f"{owner} config must be a {cls.__name__}, got {_got(config)}.")
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(str(key) for key in overrides if key not in names)
    if unknown:
        allowed = ", ".join(["config", *own_arguments, *names])
        raise SettingTypeError(f"{owner} got unexpected argument(s) {unknown}; allowed: {allowed}.")
    if config is None:
        return cls(**overrides)
    return replace(config, **overrides) if overrides else config  # type: ignore[type-var]


def signature_with_fields(function: Callable[..., Any], cls: type) -> inspect.Signature:
    """The signature of `function` with its `**kwargs` spelled out as the fields of the dataclass `cls`.

    Set as a class's `__signature__`, it makes `help()`, IDEs and `inspect.signature` show every keyword
    argument and its default, taken from the dataclass rather than restated in the constructor.
    """
    signature = inspect.signature(function)
    own = [
        p
        for name, p in signature.parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    taken = {p.name for p in own}
    spelled = []
    for f in fields(cls):
        if f.name in taken:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        spelled.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type)
        )
    return signature.replace(parameters=[*own, *spelled])
