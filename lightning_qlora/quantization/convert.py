"""Walking a model and replacing its linear layers with 4-bit ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterator

import torch
from torch import nn

from lightning_qlora._memory import release_freed_memory
from lightning_qlora._modules import set_submodule
from lightning_qlora._names import describe_names, logical_name, matches_any, unmatched_patterns
from lightning_qlora.quantization.config import DEFAULT_EXCLUDE, QuantizationConfig
from lightning_qlora.quantization.cpu_caching_allocator import release_cached
from lightning_qlora.quantization.layers import (
    KEEP_FULL_PRECISION_ATTR,
    is_linear4bit,
    quantize_layer,
    set_layer_compute_dtype,
    to_linear4bit,
)


class NoLinearLayersError(ValueError):
    """The model has no `nn.Linear` layer, so there is nothing to quantize or adapt."""


class ExcludePatternError(ValueError):
    """A user-given `exclude` pattern names no linear layer: what it meant to keep would be quantized."""


def check_exclude_patterns(model: nn.Module, config: QuantizationConfig) -> None:
    """Raise if a pattern of a user-given `exclude` names no linear layer, listing layers that exist.

    The default's pattern (``lm_head``) is exempt, alone or next to others: many models have no LM head.
    """
    names = [logical_name(n) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    missing = [p for p in unmatched_patterns(names, config.exclude) if p not in DEFAULT_EXCLUDE]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        close = sorted({c for p in missing for c in difflib.get_close_matches(p, [*leaves, *names], n=3)})
        hint = f" Did you mean {close}?" if close else ""
        raise ExcludePatternError(
            f"QLoRAPrecision exclude pattern(s) {missing} match no linear layer of {type(model).__name__}, "
            f"so nothing is kept in full precision for them.{hint} Some linear layers that exist: "
            f"{describe_names(names)}."
        )


def iter_linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Every `nn.Linear` (4-bit ones included) that is not inside a module kept in full precision."""
    kept: list[str] = []
    for name, module in model.named_modules():
        if getattr(module, KEEP_FULL_PRECISION_ATTR, False):
            kept.append(name + ".")
            continue
        if any(name.startswith(prefix) for prefix in kept):
            continue
        if isinstance(module, nn.Linear):
            yield name, module


def require_linear_layers(model: nn.Module) -> list[str]:
    names = [name for name, _ in iter_linear_layers(model)]
    if not names and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise NoLinearLayersError(
            f"{type(model).__name__} has no torch.nn.Linear layer: QLoRA quantizes and adapts linear "
            "layers, so there is nothing to do. Build the model before setup (in __init__ or "
            "configure_model)."
        )
    return names


def quantization_targets(model: nn.Module, config: QuantizationConfig) -> list[tuple[str, nn.Linear]]:
    """The linear layers `config` selects, still in full precision (an `exclude` typo is refused)."""
    check_exclude_patterns(model, config)
    return [
        (name, layer)
        for name, layer in iter_linear_layers(model)
        if not is_linear4bit(layer) and not matches_any(name, config.exclude)
    ]


def replace_linear_layers(
    model: nn.Module,
    config: QuantizationConfig,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantize_now: bool = True,
) -> list[str]:
    """Swap every selected `nn.Linear` for a 4-bit layer of `config.backend`, one layer at a time.

    With `quantize_now`, each layer is quantized right after its swap (on `device`, or where its weight
    is), so peak memory grows by one layer, never by a second copy of the model. Without it, the packed
    weights are produced when the model is moved to its device: that is how a CPU-built model that trains
    on CUDA gets quantized on CUDA.
    """
    refuse_unmeasured_keep_sensitive(config, "replace_linear_layers")
    require_linear_layers(model)
    converted = []
    for name, linear in quantization_targets(model, config):
        if linear.weight.device.type == "meta":
            raise ValueError(
                f"Layer {logical_name(name)!r} has its weights on the meta device. Load real weights first, "
                "or load them through `lightning_qlora.load_quantized`, which quantizes them as they arrive."
            )
        layer = to_linear4bit(linear, config, compute_dtype)
        set_submodule(model, name, layer)
        if quantize_now:
            quantize_layer(layer, device)
            release_cached()
            release_freed_memory()
        converted.append(name)
    return converted


def refuse_unmeasured_keep_sensitive(config: QuantizationConfig, caller: str) -> None:
    """`keep_sensitive` is measured by `QLoRAPrecision` on a calibration batch; other entry points refuse it
    rather than quantize the layers it meant to keep."""
    if config.keep_sensitive:
        raise ValueError(
            f"{caller} cannot measure layer sensitivity (keep_sensitive={config.keep_sensitive:g}): it has "
            "no calibration batch. Use QLoRAPrecision(keep_sensitive=...), or pass the layers to keep as "
            "exclude= (e.g. QLoRAPrecision's `sensitivity.kept_names` from an earlier run)."
        )


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every 4-bit layer dequantize straight into `dtype` and compute in it."""
    for module in model.modules():
        if is_linear4bit(module):
            set_layer_compute_dtype(module, dtype)
