"""`frozen_linear`: a linear layer over a 4-bit weight that keeps nothing dequantized.

Forward dequantizes the weight into the thread's workspace and multiplies; backward dequantizes it
again for the input gradient instead of saving a full-precision copy, and the frozen weight gets no
gradient. Nothing is saved for backward at all, so activation checkpointing (which re-runs forward)
and `torch.no_grad` / `inference_mode` validation need no special case. Backend-agnostic: the backend
supplies `dequantize_into`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qlora.quantization.workspace import workspace

# Writes a layer's (out, in) weight into the given buffer and returns it.
DequantizeInto = Callable[[nn.Linear, torch.Tensor], torch.Tensor]


def frozen_linear(
    x: torch.Tensor,
    layer: nn.Linear,
    dequantize_into: DequantizeInto,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`x @ W.T + bias` with `W` the layer's 4-bit weight, computed in `compute_dtype`, returned in x's dtype.

    The bias is cast for the matmul, never in place: the layer keeps it in its own dtype.
    """
    inp_dtype = x.dtype
    x = x.to(compute_dtype)
    if bias is not None:
        bias = bias.to(compute_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        out = _FrozenLinear.apply(x, bias, layer, dequantize_into)
    else:
        out = F.linear(x, _dequantized(layer, dequantize_into, x.dtype, x.device), bias)
    return out.to(inp_dtype)


def _dequantized(
    layer: nn.Linear, dequantize_into: DequantizeInto, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return dequantize_into(layer, workspace((layer.out_features, layer.in_features), dtype, device))


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layer: nn.Linear,
        dequantize_into: DequantizeInto,
    ) -> torch.Tensor:
        ctx.layer = layer
        ctx.dequantize_into = dequantize_into
        ctx.dtype = x.dtype
        ctx.device = x.device
        return F.linear(x, _dequantized(layer, dequantize_into, x.dtype, x.device), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantized(ctx.layer, ctx.dequantize_into, ctx.dtype, ctx.device)
            grad_x = grad.to(ctx.dtype) @ weight  # a new tensor: the workspace is free again afterwards
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None
