"""Which linear layers to keep out of 4-bit: each one's measured effect on a calibration loss, within a
byte budget.

Why: on a small pretrained decoder a few linear layers carry most of the loss that 4-bit storage adds (see
docs/quality.md), so keeping those few in full precision buys back more quality per byte than any format
change. The effect of a layer is measured directly: the calibration loss with that layer alone rounded
through the configured 4-bit format, minus the loss with none. That costs one forward pass per linear layer
(no backward), and holds one extra layer in memory at a time. Layers are then kept by effect per extra
byte, greedily, until the budget (a fraction of the all-4-bit model's bytes) is spent; ties are broken by
name, so the choice is deterministic for a given batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_qlora._names import logical_name
from lightning_qlora.quantization.config import QuantizationConfig
from lightning_qlora.quantization.layers import (
    dequantize_weight,
    quantize_layer,
    storage_bytes,
    to_linear4bit,
)

LossFunction = Callable[[], torch.Tensor | float]


@dataclass(frozen=True)
class LayerSensitivity:
    """One linear layer: the calibration loss rise with it alone in 4-bit, and what keeping it costs."""

    name: str  # as patterns see it: without adapter wrappers' `base_layer`
    effect: float
    full_bytes: int
    four_bit_bytes: int

    @property
    def extra_bytes(self) -> int:
        return self.full_bytes - self.four_bit_bytes


@dataclass(frozen=True)
class SensitivityChoice:
    """The outcome of a measurement: every layer's sensitivity, the budget and the layers kept."""

    fraction: float
    base_loss: float
    four_bit_model_bytes: int
    measured: tuple[LayerSensitivity, ...]
    kept: tuple[LayerSensitivity, ...]

    @property
    def budget_bytes(self) -> int:
        return int(self.fraction * self.four_bit_model_bytes)

    @property
    def extra_bytes(self) -> int:
        return sum(layer.extra_bytes for layer in self.kept)

    @property
    def kept_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.kept)

    def table(self) -> str:
        """The kept layers, their effect and bytes, for the quantization report."""
        lines = [
            f"kept by sensitivity (budget {self.fraction:.1%} of the 4-bit model = "
            f"{_mib(self.budget_bytes)}, "
            f"used {_mib(self.extra_bytes)}; calibration loss {self.base_loss:.4f} in full precision):"
        ]
        if not self.kept:
            lines.append("  none (no layer raised the calibration loss, or none fits the budget)")
        for layer in self.kept:
            lines.append(
                f"  {logical_name(layer.name)}: loss +{layer.effect:.4f} in 4-bit, +{_mib(layer.extra_bytes)}"
            )
        return "\n".join(lines)

    def summary(self) -> dict[str, object]:
        """Flat values for the report's dict (and so for loggers' hyperparameters)."""
        return {
            "keep_sensitive": self.fraction,
            "sensitive_kept_layers": ",".join(logical_name(n) for n in self.kept_names),
            "sensitive_extra_bytes": self.extra_bytes,
        }

    def as_dict(self) -> dict[str, object]:
        return {
            "fraction": self.fraction,
            "base_loss": self.base_loss,
            "four_bit_model_bytes": self.four_bit_model_bytes,
            "budget_bytes": self.budget_bytes,
            "extra_bytes": self.extra_bytes,
            "kept": [_layer_dict(layer) for layer in self.kept],
            "measured": [_layer_dict(layer) for layer in self.measured],
        }


def measure_sensitivity(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Linear]],
    config: QuantizationConfig,
    loss: LossFunction,
) -> tuple[float, list[LayerSensitivity]]:
    """The full-precision calibration loss, and each target's loss increase when it alone is in 4-bit.

    `loss` computes the calibration loss of `model` as it is; it is called once plus once per target, under
    `no_grad` with the model in eval mode (dropout off), and each target's weight is put back afterwards.
    """
    measured: list[LayerSensitivity] = []
    with torch.no_grad(), _eval_mode(model):
        base = float(loss())
        for name, layer in targets:
            rounded, four_bit = _round_trip(layer, config)
            original = layer.weight.data
            layer.weight.data = rounded
            try:
                effect = float(loss()) - base
            finally:
                layer.weight.data = original
            del rounded
            full = sum(p.numel() * p.element_size() for p in layer.parameters())
            bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
            measured.append(LayerSensitivity(logical_name(name), effect, full, four_bit + bias))
    return base, measured


def choose_kept(measured: Sequence[LayerSensitivity], budget_bytes: int) -> tuple[LayerSensitivity, ...]:
    """Keep the layers that raise the loss most per extra byte, greedily, while the budget lasts."""
    order = sorted(
        (m for m in measured if m.effect > 0),
        key=lambda m: (-m.effect / max(m.extra_bytes, 1), m.name),
    )
    kept: list[LayerSensitivity] = []
    spent = 0
    for layer in order:
        if spent + layer.extra_bytes <= budget_bytes:
            kept.append(layer)
            spent += layer.extra_bytes
    return tuple(sorted(kept, key=lambda m: -m.effect))


def choose_sensitive_layers(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Linear]],
    config: QuantizationConfig,
    loss: LossFunction,
) -> SensitivityChoice:
    """Measure every target and keep the most sensitive within `config.keep_sensitive` of the 4-bit bytes."""
    base, measured = measure_sensitivity(model, targets, config, loss)
    target_ids = {id(p) for _, layer in targets for p in layer.parameters()}
    others = sum(p.numel() * p.element_size() for p in _unique_parameters(model) if id(p) not in target_ids)
    four_bit_total = others + sum(m.four_bit_bytes for m in measured)
    budget = int(config.keep_sensitive * four_bit_total)
    return SensitivityChoice(
        config.keep_sensitive, base, four_bit_total, tuple(measured), choose_kept(measured, budget)
    )


def _round_trip(layer: nn.Linear, config: QuantizationConfig) -> tuple[torch.Tensor, int]:
    """`layer`'s weight after 4-bit storage (in its own dtype), and the bytes that storage takes."""
    copy = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    copy.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    four_bit = to_linear4bit(copy, config, None)
    quantize_layer(four_bit, layer.weight.device)
    return dequantize_weight(four_bit, layer.weight.dtype), storage_bytes(four_bit)


def _unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    yield from model.parameters()  # parameters() already skips tied duplicates


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _layer_dict(layer: LayerSensitivity) -> dict[str, object]:
    return {"name": logical_name(layer.name), "effect": layer.effect, "extra_bytes": layer.extra_bytes}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
