"""Turning `nn.Linear` layers into bitsandbytes 4-bit layers, and back.

A converted layer is a plain `bitsandbytes.nn.Linear4bit`, so PEFT, transformers and bitsandbytes'
own kernels recognise it. Two things bitsandbytes leaves open are added per layer:
quantization on the device the layer will train on, and reading its own state dict back
(bitsandbytes writes the quant-state keys but does not load them: its issue 1946).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_qlora._bnb import bitsandbytes
from lightning_qlora.quantization.config import QuantizationConfig

# A `bitsandbytes.nn.Linear4bit`. bitsandbytes ships no type information, so it is `Any` to the checker.
Linear4bit = Any

# Recorded on each converted layer for reports: the dtype its weight had before quantization.
SOURCE_DTYPE_ATTR = "_qlora_source_dtype"
# A module carrying this attribute (set to True) is never quantized: LoRA's `modules_to_save` uses it.
KEEP_FULL_PRECISION_ATTR = "_qlora_keep_full_precision"


def is_linear4bit(module: nn.Module) -> bool:
    return isinstance(module, bitsandbytes().nn.Linear4bit)


def is_quantized(module: nn.Module) -> bool:
    """True once the layer's weight holds packed 4-bit codes (not a pending full-precision tensor)."""
    return is_linear4bit(module) and bool(getattr(module.weight, "bnb_quantized", False))


def to_linear4bit(
    linear: nn.Linear, config: QuantizationConfig, compute_dtype: torch.dtype | None
) -> nn.Module:
    """A `Linear4bit` that takes over `linear`'s weight tensor without copying it.

    The weight is quantized later, by `quantize_layer` or by bitsandbytes when the layer is moved to its
    device, so the full-precision tensor is never duplicated.
    """
    bnb = bitsandbytes()
    weight = linear.weight
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=torch.uint8,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.data,
        requires_grad=False,
        blocksize=config.blocksize,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=torch.uint8,
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.train(linear.training)
    # bitsandbytes repacks weights in place for AVX512-BF16 CPU inference (eval mode, no grad). That
    # switches the storage format between training and validation steps, forces bf16, and fails for
    # layers narrower than a block; one format throughout keeps state dicts, merges and numerics stable.
    layer.support_avx512bf16_for_cpu = False
    setattr(layer, SOURCE_DTYPE_ATTR, weight.dtype)
    layer._register_load_state_dict_pre_hook(_load_quantized_weight, with_module=True)
    return layer


def set_full_precision_weight(layer: Linear4bit, weight: torch.Tensor) -> None:
    """Give a `Linear4bit` a new full-precision weight, pending quantization (keeps its format settings)."""
    bnb = bitsandbytes()
    current = layer.weight
    layer.weight = bnb.nn.Params4bit(
        weight.detach(),
        requires_grad=False,
        blocksize=current.blocksize,
        compress_statistics=current.compress_statistics,
        quant_type=current.quant_type,
        quant_storage=torch.uint8,
        module=layer,
    )
    setattr(layer, SOURCE_DTYPE_ATTR, weight.dtype)


def quantize_layer(layer: Linear4bit, device: torch.device | str | None = None) -> None:
    """Quantize a pending `Linear4bit` weight now, on `device` (default: where the weight is)."""
    weight = layer.weight
    if getattr(weight, "bnb_quantized", False):
        return
    target = torch.device(device) if device is not None else weight.device
    if target.type == "meta":
        raise RuntimeError("Cannot quantize a weight on the meta device: load real weights first.")
    layer.weight = weight._quantize(target)
    if layer.bias is not None and layer.bias.device not in (target, torch.device("meta")):
        layer.bias = nn.Parameter(layer.bias.data.to(target), requires_grad=False)


def dequantize_weight(layer: Linear4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight in full precision (a new tensor), for merging and for error measurements."""
    bnb = bitsandbytes()
    weight = layer.weight
    if not getattr(weight, "bnb_quantized", False):
        return weight.data.to(dtype or weight.dtype, copy=True)
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    full = bnb.functional.dequantize_4bit(data, state)
    return full.to(dtype) if dtype is not None else full


def quantized_weight_state(layer: Linear4bit) -> dict[str, torch.Tensor]:
    """The tensors a quantized weight is stored as: codes plus the packed quant state."""
    weight = layer.weight
    tensors = {"weight": weight.data}
    for key, value in weight.quant_state.as_dict(packed=True).items():
        tensors["weight." + key] = value
    return tensors


def _load_quantized_weight(
    module: Linear4bit,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Rebuild the 4-bit weight from what `Linear4bit` saved, or quantize a full-precision one on arrival.

    Registered as a load_state_dict pre-hook, so `model.load_state_dict(sd)` round-trips a quantized
    model (which bitsandbytes alone does not do) and also accepts an ordinary full-precision checkpoint.
    """
    bnb = bitsandbytes()
    key = prefix + "weight"
    if key not in state_dict:
        return
    stats_prefix = key + "."
    stats = {
        k[len(stats_prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(stats_prefix)
    }
    incoming = state_dict[key]
    current = module.weight
    device = current.device if current.device.type != "meta" else incoming.device
    if stats:
        new = bnb.nn.Params4bit.from_prequantized(
            data=incoming, quantized_stats=stats, requires_grad=False, device=device, module=module
        )
    elif incoming.dim() == 2 and tuple(incoming.shape) == (module.out_features, module.in_features):
        set_full_precision_weight(module, incoming.to(device, copy=incoming.device == device))
        quantize_layer(module, device)
        new = module.weight
    else:
        return  # let PyTorch report the shape mismatch
    module.weight = new
    state_dict[key] = new.data
