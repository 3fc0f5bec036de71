"""`frozen_linear`: a linear layer over a 4-bit weight that keeps nothing dequantized.

Forward dequantizes the weight into the thread's workspace and multiplies; backward dequantizes it
again for the input gradient instead of saving a full-precision copy, and the frozen weight gets no
gradient. Nothing is saved for backward at all, so activation checkpointing (which re-runs forward)
and `torch.no_grad` / `inference_mode` validation need no special case. Backend-agnostic: the backend
supplies `dequantize_into`.

Where the backend can dequantize a band of rows (`WeightTiles`), the weight is dequantized and
multiplied one band at a time: a band of a few megabytes is still in cache when the matmul reads it,
so a large full-precision weight never goes out to memory and back (on a CPU, memory bandwidth, not
arithmetic, is what dequantizing costs), and the workspace is one band, not the largest layer. Bands
much smaller than that lose more to many small matmuls than they gain in cache. Where the backend also
describes its packed weight (`WeightTiles.packed`) and the native operator is built, the whole band loop,
forward and backward, runs as that operator (`backends.linear4bit_op`) on torch's own threads, with the
same results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qlora.quantization.backends import linear4bit_op
from lightning_qlora.quantization.backends.linear4bit_op import PackedWeight4bit
from lightning_qlora.quantization.workspace import workspace

# Writes a layer's (out, in) weight into the given buffer and returns it.
DequantizeInto = Callable[[nn.Linear, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WeightTiles:
    """A weight dequantized `rows` rows at a time: `into(layer, out, first_row)` writes rows ``first_row``
    to ``first_row + out.shape[0]`` into `out` and returns it. `packed`, where given, is the same weight
    for the native operator, which then runs the band loop itself."""

    rows: int
    into: Callable[[nn.Linear, torch.Tensor, int], torch.Tensor]
    packed: PackedWeight4bit | None = None


def frozen_linear(
    x: torch.Tensor,
    layer: nn.Linear,
    dequantize_into: DequantizeInto,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None,
    tiles: WeightTiles | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` with `W` the layer's 4-bit weight, computed in `compute_dtype`, returned in x's dtype.

    The bias is cast for the matmul, never in place: the layer keeps it in its own dtype. With `tiles`
    (and more rows than one tile) the weight is dequantized and multiplied a band of rows at a time.
    """
    inp_dtype = x.dtype
    x = x.to(compute_dtype)
    if bias is not None:
        bias = bias.to(compute_dtype)
    if (
        tiles is not None
        and tiles.packed is not None
        and x.device.type == "cpu"
        and linear4bit_op.available()
    ):
        return linear4bit_op.linear4bit(x, tiles.packed, bias, tiles.rows).to(inp_dtype)
    if tiles is not None and tiles.rows >= layer.out_features:
        tiles = None  # one band is the whole weight
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        out = _FrozenLinear.apply(x, bias, layer, dequantize_into, tiles)
    else:
        out = _forward(x, bias, layer, dequantize_into, tiles)
    return out.to(inp_dtype)


def _forward(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    layer: nn.Linear,
    dequantize_into: DequantizeInto,
    tiles: WeightTiles | None,
) -> torch.Tensor:
    if tiles is None:
        return F.linear(x, _dequantized(layer, dequantize_into, x.dtype, x.device), bias)
    rows_total, cols = layer.out_features, layer.in_features
    x2 = x.reshape(-1, cols)
    out = torch.empty(x2.shape[0], rows_total, dtype=x.dtype, device=x.device)
    for first, last, weight in _bands(layer, tiles, x.dtype, x.device):
        torch.mm(x2, weight.t(), out=out[:, first:last])  # BLAS writes the column band in place
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], rows_total)


def _input_grad(
    grad: torch.Tensor, layer: nn.Linear, dequantize_into: DequantizeInto, tiles: WeightTiles | None
) -> torch.Tensor:
    """`grad @ W`: a new tensor (the workspace is free again afterwards)."""
    if tiles is None:
        return grad @ _dequantized(layer, dequantize_into, grad.dtype, grad.device)
    rows_total, cols = layer.out_features, layer.in_features
    grad2 = grad.reshape(-1, rows_total)
    grad_x = torch.empty(grad2.shape[0], cols, dtype=grad.dtype, device=grad.device)
    for first, last, weight in _bands(layer, tiles, grad.dtype, grad.device):
        if first == 0:
            torch.mm(grad2[:, first:last], weight, out=grad_x)
        else:
            grad_x.addmm_(grad2[:, first:last], weight)
    return grad_x.view(*grad.shape[:-1], cols)


def _bands(
    layer: nn.Linear, tiles: WeightTiles, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, end row, the band's weight) for each band in turn, all written into one workspace."""
    band = workspace((tiles.rows, layer.in_features), dtype, device)
    for first in range(0, layer.out_features, tiles.rows):
        last = min(first + tiles.rows, layer.out_features)
        yield first, last, tiles.into(layer, band[: last - first], first)


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
        tiles: WeightTiles | None,
    ) -> torch.Tensor:
        ctx.layer = layer
        ctx.dequantize_into = dequantize_into
        ctx.tiles = tiles
        ctx.dtype = x.dtype
        return _forward(x, bias, layer, dequantize_into, tiles)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad.to(ctx.dtype), ctx.layer, ctx.dequantize_into, ctx.tiles)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None
