"""A test-only 4-bit backend in plain torch: symmetric int4 per block of 32 weights, two codes per byte.

It exists to prove the backend seam: registered from a test, it goes through QLoRAPrecision, the LoRA
callback, a Trainer fit, reports, state dicts and merges without any of them knowing its format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_qlora.quantization.backends import QuantizationFormat
from lightning_qlora.quantization.frozen_linear import frozen_linear

NAME = "toy_int4"
BLOCK = 32
SHAPE_ATTR = "_toy_shape"


class ToyInt4Linear(nn.Linear):
    """An `nn.Linear` whose weight is packed int4 codes plus one float32 absmax per block."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype | None, device: Any
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.compute_dtype = compute_dtype
        blocks = -(-in_features * out_features // BLOCK)
        self.register_buffer("absmax", torch.zeros(blocks, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        return frozen_linear(x, self, BACKEND.dequantize_into, dtype, self.bias)


class ToyInt4Backend:
    name = NAME

    def cpu_has_native_bf16(self) -> bool:
        return False  # its matmuls are torch's own: fp32 is the safe choice on any CPU

    def make_layer(
        self, linear: nn.Linear, config: QuantizationFormat, compute_dtype: torch.dtype | None
    ) -> nn.Linear:
        device = linear.weight.device
        layer = ToyInt4Linear(
            linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device
        )
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return layer

    def set_full_precision_weight(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def quantize(self, layer: nn.Linear, device: torch.device | None) -> None:
        if self.is_quantized(layer):
            return
        w = layer.weight.data.to(device or layer.weight.device, torch.float32).flatten()
        pad = -w.numel() % BLOCK
        blocks = torch.nn.functional.pad(w, (0, pad)).view(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
        codes = (torch.round(blocks / absmax[:, None] * 7).clamp(-7, 7) + 8).to(torch.uint8).flatten()
        codes = codes[: w.numel() + (w.numel() % 2)]
        packed = (codes[0::2] << 4) | codes[1::2]
        param = nn.Parameter(packed, requires_grad=False)
        setattr(param, SHAPE_ATTR, torch.Size((layer.out_features, layer.in_features)))
        layer.weight = param
        layer.absmax = absmax
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.data.to(packed.device), requires_grad=False)

    def is_4bit_layer(self, module: nn.Module) -> bool:
        return isinstance(module, ToyInt4Linear)

    def is_quantized(self, layer: nn.Linear) -> bool:
        return layer.weight.dtype == torch.uint8

    def logical_shape(self, tensor: torch.Tensor) -> torch.Size | None:
        shape: torch.Size | None = getattr(tensor, SHAPE_ATTR, None)
        return shape

    def dequantize(self, layer: nn.Linear, dtype: torch.dtype | None) -> torch.Tensor:
        if not self.is_quantized(layer):
            return layer.weight.data.to(dtype or layer.weight.dtype, copy=True)
        out = torch.empty(layer.out_features, layer.in_features, dtype=dtype or torch.float32)
        return self.dequantize_into(layer, out)

    def dequantize_into(self, layer: nn.Linear, out: torch.Tensor) -> torch.Tensor:
        packed = layer.weight.data
        codes = torch.stack((packed >> 4, packed & 15), dim=1).flatten()[: out.numel()]
        scales = layer.absmax.repeat_interleave(BLOCK)[: out.numel()]
        out.copy_(((codes.float() - 8) / 7 * scales).view(out.shape))
        return out

    def set_compute_dtype(self, layer: nn.Linear, dtype: torch.dtype) -> None:
        layer.compute_dtype = dtype

    def storage_bytes(self, layer: nn.Linear) -> int:
        n = layer.in_features * layer.out_features
        return (n + 1) // 2 + 4 * -(-n // BLOCK)

    def state_dict_tensors(self, layer: nn.Linear) -> dict[str, torch.Tensor]:
        return {"weight": layer.weight.data, "absmax": layer.absmax}

    def load_from_state_dict(self, layer: nn.Linear, state_dict: Mapping[str, Any], prefix: str) -> None:
        incoming = state_dict.get(prefix + "weight")
        if incoming is None:
            return
        if incoming.dtype == torch.uint8:  # packed: the absmax buffer loads the ordinary way
            param = nn.Parameter(incoming.clone(), requires_grad=False)
            setattr(param, SHAPE_ATTR, torch.Size((layer.out_features, layer.in_features)))
            layer.weight = param
        elif tuple(incoming.shape) == (layer.out_features, layer.in_features):
            self.set_full_precision_weight(layer, incoming)
            self.quantize(layer, None)
            assert isinstance(state_dict, dict)
            state_dict[prefix + "weight"] = layer.weight.data
            state_dict.setdefault(prefix + "absmax", layer.absmax)


BACKEND = ToyInt4Backend()
