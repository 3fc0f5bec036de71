"""Which linear layers to keep out of 4-bit: each one's measured effect on a calibration loss, within a
byte budget.

Why: on a small pretrained decoder a few linear layers carry most of the loss that 4-bit storage adds (see
docs/quality.md), so keeping those few in full precision buys back more quality per byte than any format
change. The effect of a layer is measured on the loss itself, not on a weight or output error (which
ranked layers badly there): the loss rise with that layer alone in 4-bit. The effects do not add up on
SmolLM2 (some layers' rounding partly cancels others'), so keeping more of the individually harmful ones
can make the model worse; the choice is therefore checked as it is made: layers are taken by effect per
extra byte, greedily, and each is kept only if the calibration loss of the 4-bit model with it and those
kept before it in full precision drops. Ties are broken by name, so the choice is deterministic for a given
batch. (Measuring each layer kept alone in the 4-bit model instead, `context="four_bit"`, ranked worse
there: benchmarks/results/quality_cause_keep*.md.)

Cost: 4-bit copies of the targets (about an eighth of their fp32 bytes) beside the model, one forward pass
per target, and one per candidate tried within the budget; no backward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_qlora._modules import set_submodule
from lightning_qlora._names import logical_name
from lightning_qlora.quantization.config import QuantizationConfig
from lightning_qlora.quantization.layers import quantize_layer, storage_bytes, to_linear4bit

LossFunction = Callable[[], torch.Tensor | float]
# "full_precision" (what the package uses): the loss rise when the layer alone is in 4-bit; "four_bit": the
# loss drop when the layer alone is kept in full precision, every other target in 4-bit (compared in
# benchmarks/quality_cause.py).
Context = Literal["four_bit", "full_precision"]


@dataclass(frozen=True)
class LayerSensitivity:
    """One linear layer: its measured effect on the calibration loss (> 0: 4-bit hurts), and its cost."""

    name: str  # as patterns see it: without adapter wrappers' `base_layer`
    effect: float
    full_bytes: int
    four_bit_bytes: int

    @property
    def extra_bytes(self) -> int:
        return self.full_bytes - self.four_bit_bytes


@dataclass(frozen=True)
class SensitivityChoice:
    """The outcome of a measurement: every layer's sensitivity, the budget, the layers kept, and the
    calibration loss in full precision, all in 4-bit, and with the kept layers in full precision."""

    fraction: float
    base_loss: float
    four_bit_loss: float
    kept_loss: float
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

    @property
    def gap_closed(self) -> float:
        """The share of the calibration loss that 4-bit adds which the kept layers take back (0 to 1)."""
        gap = self.four_bit_loss - self.base_loss
        return (self.four_bit_loss - self.kept_loss) / gap if gap > 0 else 0.0

    def table(self) -> str:
        """The kept layers, their effect and bytes, for the quantization report."""
        lines = [
            f"kept by sensitivity (budget {self.fraction:.1%} of the 4-bit model = "
            f"{_mib(self.budget_bytes)}, used {_mib(self.extra_bytes)}); calibration loss "
            f"{self.base_loss:.4f} in full precision, {self.four_bit_loss:.4f} all in 4-bit, "
            f"{self.kept_loss:.4f} with these kept ({self.gap_closed:.0%} of the gap):"
        ]
        if not self.kept:
            lines.append("  none (no layer lowered the calibration loss, or none fits the budget)")
        for layer in self.kept:
            name, extra = logical_name(layer.name), _mib(layer.extra_bytes)
            lines.append(f"  {name}: effect on the loss {layer.effect:+.4f}, +{extra}")
        return "\n".join(lines)

    def summary(self) -> dict[str, object]:
        """Flat values for the report's dict (and so for loggers' hyperparameters)."""
        return {
            "keep_sensitive": self.fraction,
            "sensitive_kept_layers": ",".join(logical_name(n) for n in self.kept_names),
            "sensitive_extra_bytes": self.extra_bytes,
            "calibration_loss_full_precision": self.base_loss,
            "calibration_loss_4bit": self.four_bit_loss,
            "calibration_loss_kept": self.kept_loss,
        }

    def as_dict(self) -> dict[str, object]:
        return {
            "fraction": self.fraction,
            "base_loss": self.base_loss,
            "four_bit_loss": self.four_bit_loss,
            "kept_loss": self.kept_loss,
            "four_bit_model_bytes": self.four_bit_model_bytes,
            "budget_bytes": self.budget_bytes,
            "extra_bytes": self.extra_bytes,
            "kept": [_layer_dict(layer) for layer in self.kept],
            "measured": [_layer_dict(layer) for layer in self.measured],
        }


class _Swaps:
    """Every target beside a 4-bit copy of itself; either can be put in the model, one layer at a time.

    The originals are not copied (the model's own layers are kept aside), so the extra memory is the 4-bit
    copies alone. Leaving the context puts every original back.
    """

    def __init__(
        self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]], config: QuantizationConfig
    ) -> None:
        self.model = model
        self.original = dict(targets)
        self.four_bit: dict[str, nn.Linear] = {}
        for name, layer in targets:
            self.four_bit[name] = _four_bit_copy(layer, config)

    def use_four_bit(self, name: str) -> None:
        set_submodule(self.model, name, self.four_bit[name])

    def use_original(self, name: str) -> None:
        set_submodule(self.model, name, self.original[name])

    def restore(self) -> None:
        for name in self.original:
            self.use_original(name)


def measure_sensitivity(
    swaps: _Swaps, loss: LossFunction, base: float, four_bit: float, context: Context
) -> list[LayerSensitivity]:
    """Each target's effect in `context`; the model is left with every target in 4-bit."""
    measured: list[LayerSensitivity] = []
    if context == "full_precision":
        swaps.restore()
    for name in swaps.original:
        if context == "four_bit":
            swaps.use_original(name)
            effect = four_bit - float(loss())
            swaps.use_four_bit(name)
        else:
            swaps.use_four_bit(name)
            effect = float(loss()) - base
            swaps.use_original(name)
        layer = swaps.original[name]
        full = sum(p.numel() * p.element_size() for p in layer.parameters())
        bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
        four_bit_bytes = storage_bytes(swaps.four_bit[name]) + bias
        measured.append(LayerSensitivity(logical_name(name), effect, full, four_bit_bytes))
    for name in swaps.original:
        swaps.use_four_bit(name)
    return measured


def choose_kept(
    measured: Sequence[LayerSensitivity],
    budget_bytes: int,
    accept: Callable[[LayerSensitivity], bool] | None = None,
) -> tuple[LayerSensitivity, ...]:
    """Keep the layers that lower the loss most per extra byte, greedily, while the budget lasts.

    `accept`, if given, is asked about each candidate that fits (in that order) and may refuse it.
    """
    order = sorted(
        (m for m in measured if m.effect > 0),
        key=lambda m: (-m.effect / max(m.extra_bytes, 1), m.name),
    )
    kept: list[LayerSensitivity] = []
    spent = 0
    for layer in order:
        if spent + layer.extra_bytes <= budget_bytes and (accept is None or accept(layer)):
            kept.append(layer)
            spent += layer.extra_bytes
    return tuple(sorted(kept, key=lambda m: (-m.effect, m.name)))


def choose_sensitive_layers(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Linear]],
    config: QuantizationConfig,
    loss: LossFunction,
    *,
    context: Context = "full_precision",
    verify: bool = True,
    measured: Sequence[LayerSensitivity] | None = None,
    not_counted: Collection[nn.Parameter] = (),
) -> SensitivityChoice:
    """Measure every target and keep the most sensitive within `config.keep_sensitive` of the 4-bit bytes.

    `loss` computes the calibration loss of `model` as it is; it is called under `no_grad` with the model
    in eval mode (dropout off), and the model is left as it was. With `verify`, a candidate is kept only if
    the loss with it (and those kept before) in full precision is lower than without. `measured` (from an
    earlier choice on the same model and batch) skips the per-layer measurement. `not_counted` parameters
    (LoRA adapters) are no part of the model whose bytes the budget is a fraction of.
    """
    target_ids = {id(p) for _, layer in targets for p in layer.parameters()}
    target_ids |= {id(p) for p in not_counted}
    others = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in target_ids)
    with torch.no_grad(), _eval_mode(model):
        base = float(loss())
        swaps = _Swaps(model, targets, config)
        try:
            for name in swaps.original:
                swaps.use_four_bit(name)
            four_bit = float(loss()) if targets else base
            if measured is None:
                measured = measure_sensitivity(swaps, loss, base, four_bit, context)
            four_bit_total = others + sum(m.four_bit_bytes for m in measured)
            budget = int(config.keep_sensitive * four_bit_total)
            by_name = {logical_name(name): name for name in swaps.original}
            current = [four_bit]

            def accept(layer: LayerSensitivity) -> bool:
                swaps.use_original(by_name[layer.name])
                tried = float(loss())
                if tried < current[0]:
                    current[0] = tried
                    return True
                swaps.use_four_bit(by_name[layer.name])
                return False

            kept = choose_kept(measured, budget, accept if verify else None)
            if not verify and kept:
                for layer in kept:
                    swaps.use_original(by_name[layer.name])
                current[0] = float(loss())
        finally:
            swaps.restore()
    return SensitivityChoice(
        config.keep_sensitive, base, four_bit, current[0], four_bit_total, tuple(measured), kept
    )


def _four_bit_copy(layer: nn.Linear, config: QuantizationConfig) -> nn.Linear:
    """A quantized 4-bit copy of `layer` (bias shared), computing in the layer's own dtype."""
    copy = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    copy.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    if layer.bias is not None:
        copy.bias = layer.bias
    four_bit = to_linear4bit(copy, config, layer.weight.dtype)
    quantize_layer(four_bit, layer.weight.device)
    four_bit.train(layer.training)
    return four_bit


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
