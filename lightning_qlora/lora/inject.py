"""Finding the linear layers to adapt, wrapping them, and freezing everything else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_qlora._modules import set_submodule
from lightning_qlora._names import describe_names, logical_name, matches, matches_any, unmatched_patterns
from lightning_qlora.lora.adapter import (
    adapter_modules,
    is_adapter,
)
from lightning_qlora.lora.config import LoRAConfig
from lightning_qlora.lora.loftq import apply_loftq, check_loftq_ready
from lightning_qlora.lora.siblings import group_siblings
from lightning_qlora.lora.variants import get_variant
from lightning_qlora.quantization.config import QuantizationConfig
from lightning_qlora.quantization.convert import iter_linear_layers, require_linear_layers
from lightning_qlora.quantization.layers import KEEP_FULL_PRECISION_ATTR, is_linear4bit
from lightning_qlora.quantization.layers import logical_numel as quantized_numel


class PatternMatchError(ValueError):
    """A module-name pattern names no module of the model (most often a typo)."""


@dataclass(frozen=True)
class AdapterSummary:
    """What injection did: the numbers the callback prints and tests check."""

    adapted_layers: int
    trainable_params: int
    total_params: int

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def table(self) -> str:
        return (
            f"LoRA: {self.adapted_layers} adapted layers | trainable params {self.trainable_params:,} | "
            f"total params {self.total_params:,} | trainable {100 * self.trainable_share:.3f}%"
        )


def check_patterns(model: nn.Module, config: LoRAConfig, check_exclude: bool = False) -> None:
    """Raise if a user-given pattern names no module, listing names that do exist."""
    linear_names = [logical_name(n) for n, _ in iter_linear_layers(model)]
    all_names = [logical_name(n) for n, _ in model.named_modules() if n]
    checks: list[tuple[str, tuple[str, ...] | list[str], list[str]]] = [
        ("target_modules", config.target_modules or (), linear_names),
        ("rank_pattern", list(config.rank_pattern), linear_names),
        ("alpha_pattern", list(config.alpha_pattern), linear_names),
        ("modules_to_save", config.modules_to_save, all_names),
    ]
    if check_exclude:
        checks.append(("exclude", config.exclude, linear_names))
    for what, patterns, names in checks:
        missing = unmatched_patterns(names, patterns)
        if missing:
            raise PatternMatchError(
                f"LoRA {what} pattern(s) {missing} match no module of {type(model).__name__}. "
                f"Some module names that exist: {describe_names(names)}."
            )


def inject_adapters(
    model: nn.Module, config: LoRAConfig, quantization: QuantizationConfig | None = None
) -> list[str]:
    """Wrap every selected linear layer in the layer class of `config.variant` (`LoRALinear`, `DoRALinear`
    or a registered one: `lora.variants`); already adapted layers are left alone. With
    `config.init == "loftq"`, each base is quantized in `quantization`'s format right here, by LoftQ, which
    also sets A and B.

    Returns the names of the newly adapted layers. Idempotent, so it is safe to call again after
    `configure_model` has built more of the model.
    """
    require_linear_layers(model)
    flagged = {id(m) for m in model.modules() if getattr(m, KEEP_FULL_PRECISION_ATTR, False)}
    mark_modules_to_save(model, config)  # before planning: layers inside modules_to_save are not adapted
    try:
        plan, loftq = _plan(model, config, quantization)
    except BaseException:  # refused: the model is left as it was, flags included
        for module in model.modules():
            if id(module) not in flagged and KEEP_FULL_PRECISION_ATTR in vars(module):
                delattr(module, KEEP_FULL_PRECISION_ATTR)
        raise
    adapter_class = get_variant(config.variant_name).layer_class
    adapted: dict[str, Any] = {}
    for name, linear, r, alpha in plan:
        layer: Any = adapter_class(  # the constructor every registered variant's layer class has
            linear,
            r=int(r),
            alpha=float(alpha),
            dropout=config.dropout,
            scaling=config.scaling(int(r), float(alpha)),
            dtype=config.dtype,
        )
        layer.train(linear.training)
        if loftq is not None and not matches_any(name, loftq.exclude):  # kept full precision: plain init
            apply_loftq(layer, loftq, config.loftq_iter)
        set_submodule(model, name, layer)
        adapted[name] = layer
    if config.share_sibling_input:
        group_siblings(adapted)
    return list(adapted)


def _plan(
    model: nn.Module, config: LoRAConfig, quantization: QuantizationConfig | None
) -> tuple[list[tuple[str, nn.Linear, float, float]], Any]:
    """The layers to adapt with their rank and alpha, every check done before any layer is wrapped."""
    plan: list[tuple[str, nn.Linear, float, float]] = []
    other_rank = []
    for name, linear in list(iter_linear_layers(model)):
        parent = _parent(model, name)
        if is_adapter(parent):
            plain = logical_name(name)
            wanted = int(_pattern_value(plain, config.rank_pattern, config.r))
            targeted = config.target_modules is None or matches_any(plain, config.target_modules)
            has = getattr(parent, "r", wanted)
            if targeted and not matches_any(plain, config.exclude) and has != wanted:
                other_rank.append(f"{plain!r} (r={has}, asked r={wanted})")
            continue
        if config.target_modules is not None and not matches_any(name, config.target_modules):
            continue
        if matches_any(name, config.exclude):
            continue
        r = _pattern_value(name, config.rank_pattern, config.r)
        alpha = _pattern_value(name, config.alpha_pattern, config.alpha)
        plan.append((name, linear, r, alpha))
    if other_rank:
        raise ValueError(
            f"{type(model).__name__} is already adapted with other ranks than this LoRA asks for: "
            f"{', '.join(other_rank[:4])}{' ...' if len(other_rank) > 4 else ''}. Adapters already in place "
            "are kept as they are, so the new rank would be ignored. Train a freshly built model for another "
            "r, or keep the rank the adapters have."
        )
    if not plan and not config.modules_to_save and not any(is_adapter(m) for m in model.modules()):
        linear_names = [logical_name(n) for n, _ in iter_linear_layers(model)]
        raise PatternMatchError(
            f"LoRA would adapt no layer of {type(model).__name__}: target_modules="
            f"{_shown(config.target_modules)} and exclude={_shown(config.exclude)} leave out every linear "
            f"layer ({describe_names(linear_names)}) and modules_to_save is empty, so nothing would train. "
            "Narrow exclude or widen target_modules."
        )
    check_ranks([(name, linear, int(r)) for name, linear, r, _ in plan])
    loftq = check_loftq_ready([p[:2] for p in plan], quantization) if config.init == "loftq" else None
    return plan, loftq


def mark_modules_to_save(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Flag `modules_to_save` so the quantizer keeps them in full precision and they stay trainable."""
    marked = []
    for name, module in model.named_modules():
        if name and matches_any(name, config.modules_to_save):
            setattr(module, KEEP_FULL_PRECISION_ATTR, True)
            marked.append(name)
    return marked


def _shown(patterns: object) -> str:
    return "None (all)" if patterns is None else repr(list(patterns))  # type: ignore[call-overload]


def check_ranks(plan: list[tuple[str, nn.Module, int]]) -> None:
    """Refuse, before any allocation, a rank above the larger side of the layer it adapts.

    The update B @ A has rank at most min(in, out), so a larger r only adds parameters; a rank above
    max(in, out) is a mistake (r=10**9 would otherwise ask for hundreds of GB).
    """
    too_big = []
    for name, linear, r in plan:
        sizes = (getattr(linear, "in_features", 0), getattr(linear, "out_features", 0))
        if r > max(sizes):
            too_big.append(f"{logical_name(name)!r} ({sizes[0]} -> {sizes[1]}): r={r}")
    if too_big:
        raise ValueError(
            f"LoRA rank too large for {len(too_big)} layer(s): {', '.join(too_big[:4])}. r may be at most "
            "the layer's larger side (in_features or out_features); the update's rank cannot exceed the "
            "smaller one. Lower r or set rank_pattern for these layers."
        )


def summarize(model: nn.Module) -> AdapterSummary:
    trainable = total = 0
    # a 4-bit weight loaded as this process's rows (load_quantized(shard=...)) counts as its whole matrix
    whole: dict[int, int] = {
        id(sub.weight): int(sub.in_features) * int(sub.out_features)
        for sub in model.modules()
        if isinstance(sub, nn.Linear) and is_linear4bit(sub)
    }
    for param in model.parameters():
        n = whole.get(id(param)) or logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return AdapterSummary(
        adapted_layers=sum(1 for _ in adapter_modules(model)), trainable_params=trainable, total_params=total
    )


def logical_numel(param: nn.Parameter) -> int:
    """A 4-bit weight's parameter count is that of the matrix it encodes, not of its packed bytes."""
    return quantized_numel(param)


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    parent_name, _, _ = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else None


def _pattern_value(name: str, patterns: Mapping[str, float], default: float) -> float:
    for pattern, value in patterns.items():
        if matches(name, pattern):
            return value
    return default
