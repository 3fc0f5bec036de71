"""Public names imported on first use (PEP 562), so importing a package costs nothing until a name is used.

`import lightning_qlora` must not import torch or Lightning: the training command answers `--help`,
`--version` and `--cfg job` at once. Each package maps its public names to their defining modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` that import ``exports`` (name -> module) lazily."""
    package = namespace["__name__"]

    def get_attribute(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def list_names() -> list[str]:
        return sorted([*namespace, *exports])

    return get_attribute, list_names
