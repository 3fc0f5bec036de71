"""4-bit storage backends: the protocol, the registry, and lookup of the backend that owns a layer.

`QuantizationConfig.backend` names one; "bitsandbytes" is built in and imported on first use. Another
backend registers itself with `register_backend(name, factory)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lightning_qlora.quantization.backends.base import QuantizationBackend, QuantizationFormat

if (
    TYPE_CHECKING
):  # the config (and the CLI's schema) import this registry; torch only when a layer is looked at
    import torch
    from torch import nn

DEFAULT_BACKEND = "bitsandbytes"


def _bitsandbytes() -> QuantizationBackend:
    from lightning_qlora.quantization.backends.bitsandbytes import BACKEND

    return BACKEND


_FACTORIES: dict[str, Callable[[], QuantizationBackend]] = {DEFAULT_BACKEND: _bitsandbytes}
_INSTANCES: dict[str, QuantizationBackend] = {}


class UnknownBackendError(ValueError):
    """A backend name that is not registered."""


def backend_names() -> tuple[str, ...]:
    """The registered backend names, the built-in one first."""
    return tuple(_FACTORIES)


def register_backend(name: str, factory: Callable[[], QuantizationBackend]) -> None:
    """Make `name` usable as `QuantizationConfig.backend`; `factory` is called once, on first use."""
    if not name or not isinstance(name, str):
        raise ValueError(f"A backend name must be a non-empty string, got {name!r}.")
    if name in _FACTORIES:
        raise ValueError(f"A quantization backend named {name!r} is already registered.")
    _FACTORIES[name] = factory


def unregister_backend(name: str) -> None:
    """Remove a registered backend (the built-in one stays)."""
    if name == DEFAULT_BACKEND:
        raise ValueError(f"The built-in backend {DEFAULT_BACKEND!r} cannot be unregistered.")
    _FACTORIES.pop(name, None)
    _INSTANCES.pop(name, None)


def check_backend_name(name: str) -> None:
    """Raise, naming the allowed values, unless `name` is registered."""
    if name not in _FACTORIES:
        raise UnknownBackendError(
            f"Unknown quantization backend {name!r}; allowed: {', '.join(backend_names())}."
        )


def get_backend(name: str = DEFAULT_BACKEND) -> QuantizationBackend:
    """The backend registered as `name` (created on first use)."""
    check_backend_name(name)
    backend = _INSTANCES.get(name)
    if backend is None:
        backend = _INSTANCES[name] = _FACTORIES[name]()
    return backend


def backend_of(module: nn.Module) -> QuantizationBackend | None:
    """The backend whose 4-bit layer `module` is, or None for any other module."""
    from torch import nn

    if not isinstance(module, nn.Linear):
        return None
    for name in _FACTORIES:
        backend = get_backend(name)
        if backend.is_4bit_layer(module):
            return backend
    return None


def backend_of_tensor(tensor: torch.Tensor) -> tuple[QuantizationBackend, torch.Size] | None:
    """The backend that packed `tensor` and the (out, in) shape it encodes, or None for a plain tensor."""
    for name in _FACTORIES:
        backend = get_backend(name)
        shape = backend.logical_shape(tensor)
        if shape is not None:
            return backend, shape
    return None


__all__ = [
    "DEFAULT_BACKEND",
    "QuantizationBackend",
    "QuantizationFormat",
    "UnknownBackendError",
    "backend_names",
    "backend_of",
    "backend_of_tensor",
    "check_backend_name",
    "get_backend",
    "register_backend",
    "unregister_backend",
]
