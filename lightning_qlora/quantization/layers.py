"""Turning `nn.Linear` layers into 4-bit ones, and back, through the configured backend.

These functions are what the rest of the package calls; each finds the backend that owns the layer
(`backends.backend_of`) and delegates, so no module outside `backends/` knows a storage format. A
converted layer is still an `nn.Linear` subclass (with bitsandbytes, a `bitsandbytes.nn.Linear4bit`),
so PEFT, transformers and adapter injection recognise it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from lightning_qlora.quantization.backends import (
    QuantizationBackend,
    backend_of,
    backend_of_tensor,
    get_backend,
)
from lightning_qlora.quantization.config import QuantizationConfig

# Recorded on each converted layer for reports: the dtype its weight had before quantization.
SOURCE_DTYPE_ATTR = "_qlora_source_dtype"
# A module carrying this attribute (set to True) is never quantized: LoRA's `modules_to_save` uses it.
KEEP_FULL_PRECISION_ATTR = "_qlora_keep_full_precision"


def is_linear4bit(module: nn.Module) -> bool:
    """True for a 4-bit layer of any registered backend, packed or pending."""
    return backend_of(module) is not None


def is_quantized(module: nn.Module) -> bool:
    """True once the layer's weight holds packed 4-bit codes (not a pending full-precision tensor)."""
    backend = backend_of(module)
    return backend is not None and backend.is_quantized(_linear(module))


def is_quantized_weight(tensor: torch.Tensor) -> bool:
    """True for a packed 4-bit weight tensor (a parameter of a quantized layer)."""
    return backend_of_tensor(tensor) is not None


def logical_numel(param: torch.Tensor) -> int:
    """A 4-bit weight's parameter count is that of the matrix it encodes, not of its packed bytes."""
    found = backend_of_tensor(param)
    return int(found[1].numel()) if found is not None else param.numel()


def layer_backend(layer: nn.Module) -> QuantizationBackend:
    """The backend owning `layer`; a TypeError naming the layer type if it is not a 4-bit layer."""
    backend = backend_of(layer)
    if backend is None:
        raise TypeError(f"{type(layer).__name__} is not a 4-bit layer of any registered backend.")
    return backend


def _linear(layer: nn.Module) -> nn.Linear:
    return cast(nn.Linear, layer)  # every backend's layer subclasses nn.Linear (checked by backend_of)


def to_linear4bit(
    linear: nn.Linear, config: QuantizationConfig, compute_dtype: torch.dtype | None
) -> nn.Linear:
    """A 4-bit layer of `config.backend` that takes over `linear`'s weight tensor without copying it.

    The weight is quantized later, by `quantize_layer` or by the backend when the layer is moved to its
    device, so the full-precision tensor is never duplicated.
    """
    source_dtype = linear.weight.dtype
    layer = get_backend(config.backend).make_layer(linear, config, compute_dtype)
    setattr(layer, SOURCE_DTYPE_ATTR, source_dtype)
    layer._register_load_state_dict_pre_hook(_load_quantized_weight, with_module=True)
    return layer


def set_full_precision_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Give a 4-bit layer a new full-precision weight, pending quantization (keeps its format settings)."""
    layer_backend(layer).set_full_precision_weight(_linear(layer), weight)
    setattr(layer, SOURCE_DTYPE_ATTR, weight.dtype)


def quantize_layer(layer: nn.Module, device: torch.device | str | None = None) -> None:
    """Quantize a pending 4-bit layer's weight now, on `device` (default: where the weight is)."""
    layer_backend(layer).quantize(_linear(layer), torch.device(device) if device is not None else None)


def dequantize_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight in full precision (a new tensor), for merging and for error measurements.

    A layer that is not 4-bit (a full-precision base) gives a copy of its weight, so callers need not
    tell the two apart.
    """
    backend = backend_of(layer)
    if backend is None:
        weight = _linear(layer).weight
        return weight.data.to(dtype or weight.dtype, copy=True)
    return backend.dequantize(_linear(layer), dtype)


def set_layer_compute_dtype(layer: nn.Module, dtype: torch.dtype) -> None:
    """Make a 4-bit layer dequantize straight into `dtype` and compute in it."""
    layer_backend(layer).set_compute_dtype(_linear(layer), dtype)


def storage_bytes(layer: nn.Module) -> int:
    """Bytes the layer's packed weight takes (or will take, if still pending)."""
    return layer_backend(layer).storage_bytes(_linear(layer))


def quantized_weight_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a quantized weight is stored as: codes plus the packed quant state."""
    return layer_backend(layer).state_dict_tensors(_linear(layer))


def _load_quantized_weight(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Rebuild the 4-bit weight from what the layer saved, or quantize a full-precision one on arrival.

    Registered as a load_state_dict pre-hook, so `model.load_state_dict(sd)` round-trips a quantized
    model (which bitsandbytes alone does not do) and also accepts an ordinary full-precision checkpoint.
    """
    backend = backend_of(module)
    if backend is None:
        return
    incoming = state_dict.get(prefix + "weight")
    if isinstance(incoming, torch.Tensor) and incoming.is_floating_point() and incoming.dim() == 2:
        setattr(module, SOURCE_DTYPE_ATTR, incoming.dtype)  # full precision, quantized on arrival
    backend.load_from_state_dict(_linear(module), state_dict, prefix)
