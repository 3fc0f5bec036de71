"""LoftQ: start A and B from the quantization residual, so the adapted 4-bit layer starts near W.

LoftQ (Li et al. 2023; PEFT's `loftq_utils`) alternates two steps, `iterations` times, on one layer:

    Q      = quantize(W - L R)          (L R = 0 in the first iteration: plain quantization of W)
    L, R   = rank-r SVD of W - deq(Q)

and returns Q as the base and L R as the initial update (split evenly between B and A, and divided by
the adapter's scale, so that `scale * B @ A == L R`). After one iteration Q is the plain quantization of W;
after more, Q is the quantization of `W - L R`, a base that differs from plain quantization: whoever loads
the adapters elsewhere needs that base too (the LoRA callback exports it).

Quantization goes through the configured backend (`quantization.layers`), so Q is exactly the format the
model trains with; the full-precision weight is needed once, at injection, one layer at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_qlora._names import describe_names, logical_name, matches_any
from lightning_qlora._settings import check_int
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.lora.variants import variant_of
from lightning_qlora.quantization.config import QuantizationConfig
from lightning_qlora.quantization.layers import (
    SOURCE_DTYPE_ATTR,
    dequantize_weight,
    is_linear4bit,
    quantize_layer,
    to_linear4bit,
)


@dataclass(frozen=True)
class LoftQInit:
    """One layer's LoftQ start: the 4-bit base Q and the adapter matrices, with the errors on the way."""

    base: nn.Linear
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    plain_error: float
    """||W - deq(quantize(W))|| / ||W||: the relative error of plain quantization (Frobenius norms)."""
    errors: tuple[float, ...]
    """||W - deq(Q) - L R|| / ||W|| after each iteration."""


@torch.no_grad()
def loftq_init(
    linear: nn.Linear,
    quantization: QuantizationConfig,
    r: int,
    scaling: float,
    iterations: int = 1,
    dtype: torch.dtype = torch.float32,
) -> LoftQInit:
    """LoftQ for one full-precision layer: a 4-bit copy of it (Q) and A, B with `scaling * B @ A ~ W - Q`.

    `linear` is not changed; its bias is shared with the returned base. Peak memory is a few copies of
    this one layer's weight in float32 (W, the residual and its SVD factors).
    """
    check_int("LoftQ", "iterations", iterations, minimum=1)
    check_int("LoftQ", "r", r, minimum=1)
    if is_linear4bit(linear):
        raise ValueError(
            "LoftQ needs the full-precision weight, and this layer is already 4-bit. Build or load the model "
            "in full precision (not with load_quantized) and let QLoRAPrecision quantize it after injection."
        )
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise ValueError("LoftQ needs real weights; this layer's weight is on the meta device.")
    full = weight.to(torch.float32)
    scale = float(torch.linalg.vector_norm(full)) or 1.0
    target = weight  # the first iteration quantizes W as it is: plain quantization
    errors: list[float] = []
    plain_error = math.nan
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None
    base: nn.Linear | None = None
    for step in range(iterations):
        if low_rank is not None:
            target = full - low_rank[0] @ low_rank[1]
        base = _quantized(linear, target, quantization)
        residual = full - dequantize_weight(base, torch.float32)
        if step == 0:
            plain_error = float(torch.linalg.vector_norm(residual)) / scale
        low_rank = _low_rank(residual, r)
        residual -= low_rank[0] @ low_rank[1]
        errors.append(float(torch.linalg.vector_norm(residual)) / scale)
        del residual
    assert base is not None and low_rank is not None
    left, right = low_rank
    root = math.sqrt(scaling)
    lora_a, lora_b = _pad_rank(right / root, left / root, r, linear)
    setattr(base, SOURCE_DTYPE_ATTR, weight.dtype)
    base.train(linear.training)
    return LoftQInit(
        base=base,
        lora_a=lora_a.to(dtype),
        lora_b=lora_b.to(dtype),
        plain_error=plain_error,
        errors=tuple(errors),
    )


def _quantized(linear: nn.Linear, weight: torch.Tensor, quantization: QuantizationConfig) -> nn.Linear:
    """A 4-bit layer (of `quantization.backend`) holding `weight`, quantized now where `weight` is."""
    holder = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    holder.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        holder.bias = linear.bias
    layer = to_linear4bit(holder, quantization, compute_dtype=None)
    quantize_layer(layer)
    return layer


def _low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L (out, k), R (k, in) with L R the best rank-k approximation, k = min(r, rank bound)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    k = min(r, s.shape[0])
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def _pad_rank(
    lora_a: torch.Tensor, lora_b: torch.Tensor, r: int, linear: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks past min(out, in) carry nothing: A rows as in plain LoRA, B columns zero (product unchanged)."""
    missing = r - lora_a.shape[0]
    if missing <= 0:
        return lora_a, lora_b
    extra_a = torch.empty(missing, linear.in_features, device=lora_a.device)
    nn.init.kaiming_uniform_(extra_a, a=math.sqrt(5))
    extra_b = torch.zeros(linear.out_features, missing, device=lora_b.device)
    return torch.cat([lora_a, extra_a]), torch.cat([lora_b, extra_b], dim=1)


def check_loftq_ready(
    layers: Sequence[tuple[str, nn.Module]], quantization: QuantizationConfig | None
) -> QuantizationConfig:
    """Refuse LoftQ before any work unless a 4-bit format is given and every layer it will quantize (those
    `quantization.exclude` does not keep in full precision) is still full precision."""
    if quantization is None:
        raise ValueError(
            "LoRA init='loftq' initialises adapters from the 4-bit quantization residual, so it needs the "
            "quantization format: train with QLoRAPrecision (or pass quantization=QuantizationConfig(...) to "
            "inject_adapters). Without a 4-bit base use init='default'."
        )
    layers = [(name, layer) for name, layer in layers if not matches_any(name, quantization.exclude)]
    four_bit = [logical_name(name) for name, layer in layers if is_linear4bit(layer)]
    meta = [
        logical_name(name)
        for name, layer in layers
        if isinstance(layer, nn.Linear) and layer.weight.device.type == "meta"
    ]
    if four_bit or meta:
        which = f"already 4-bit: {describe_names(four_bit, 4)}" if four_bit else ""
        which += ("; " if four_bit and meta else "") + (
            f"on the meta device: {describe_names(meta, 4)}" if meta else ""
        )
        raise ValueError(
            f"LoRA init='loftq' needs each adapted layer's full-precision weight at injection; layers are "
            f"{which}. Build or load the model in full precision (not with load_quantized) and let "
            "QLoRAPrecision quantize it after the adapters are injected."
        )
    return quantization


def apply_loftq(layer: LoRALinear, quantization: QuantizationConfig, iterations: int = 1) -> LoftQInit:
    """Give a freshly injected adapter LoftQ's start: its base becomes Q (4-bit), A and B the residual's.

    The full-precision base layer is dropped from the adapter (freed unless referenced elsewhere), so the
    model holds one full-precision layer at a time, never a second copy of itself.
    """
    base = layer.base_layer
    assert isinstance(base, nn.Linear)
    start = loftq_init(
        base, quantization, r=layer.r, scaling=layer.scaling, iterations=iterations, dtype=layer.lora_A.dtype
    )
    with torch.no_grad():
        layer.lora_A.copy_(start.lora_a)
        layer.lora_B.copy_(start.lora_b)
    layer.base_layer = start.base
    variant = variant_of(layer)
    if variant.base_replaced is not None:  # e.g. DoRA's magnitude follows the new base and update
        variant.base_replaced(layer)
    return start


LOFTQ_BASE_DIR = "loftq_base"
"""Sub-folder of an adapter export holding LoftQ's base, when it differs from plain quantization."""


def save_loftq_base(model: nn.Module, adapter_dir: str | os.PathLike[str]) -> Path:
    """Write the base the LoftQ adapters of `model` were fitted to, beside them: `<adapter_dir>/loftq_base`.

    After more than one LoftQ round the 4-bit base is the quantization of `W - L R`, not of W, so loading
    the adapters onto the original model would give another model. The base is written dequantized (what
    the 4-bit layers compute with), as a transformers folder for a transformers model, else as
    `model.safetensors`; PEFT over it computes what the trained 4-bit model computes.
    """
    from lightning_qlora.lora.merge import save_merged

    return save_merged(model, Path(adapter_dir) / LOFTQ_BASE_DIR, with_adapters=False)
