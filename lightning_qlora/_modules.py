"""Small helpers for editing a module tree in place."""

from __future__ import annotations

from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (PyTorch has `get_submodule` but no setter)."""
    parent_name, _, child = name.rpartition(".")
    if not child:
        raise ValueError("Cannot replace the root module itself.")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
