"""Checks of an untrusted PEFT adapter folder, all made before `load_peft_adapter` touches the model.

A folder from elsewhere could otherwise poison the model it is loaded into: a `lora_alpha` of NaN or
1e308 makes every logit non-finite, a tensor the config never declared (`...lm_head.weight`) overwrites a
base weight, NaN adapter tensors load silently, an empty weights file loads nothing. Every refusal is one
`InvalidAdapterError` naming the file, the entry and what is allowed.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_qlora._names import describe_names
from lightning_qlora.lora.guard import nonfinite_names
from lightning_qlora.lora.variants import all_variants

# The fields of PEFT's LoraConfig (0.21) that lightning-qlora understands or can ignore: names, metadata,
# and settings that only matter when PEFT initialises new adapters.
KNOWN_KEYS = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
        "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
        "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core", "modules_to_save",
        "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
        "target_modules",
        "target_parameters", "task_type", "use_dora", "use_rslora",
    }
)  # fmt: skip
# PEFT features that change what the adapter computes or the model's structure; refused when set.
UNSUPPORTED_FEATURES = (
    "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "monteclora_config",
    "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
)  # fmt: skip
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT32_MAX = torch.finfo(torch.float32).max


class InvalidAdapterError(ValueError):
    """An adapter folder is malformed or would poison the model; refused before the model is changed."""


def parse_adapter_config(path: Path) -> dict[str, Any]:
    """`adapter_config.json` as a dict, with every field this package uses typed and in range."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidAdapterError(f"{path} is not valid JSON: {err}.") from err
    if not isinstance(config, dict):
        raise InvalidAdapterError(
            f"{path} holds a JSON {type(config).__name__}; an adapter config is a JSON object "
            '({"r": 8, "lora_alpha": 16, ...}).'
        )
    check_adapter_config(config, path)
    return config


def check_adapter_config(config: Mapping[str, Any], path: Path) -> None:
    """Refuse unknown settings, wrong types, non-finite or non-positive numbers and broken patterns."""
    unknown = sorted(
        k for k, v in config.items() if k not in KNOWN_KEYS and v not in (None, False, [], {}, "")
    )
    variant_fields = {key for variant in all_variants() for key in variant.peft_fields}
    unknown = [
        k
        for k in unknown
        if k not in UNSUPPORTED_FEATURES and k not in _peft_lora_fields() and k not in variant_fields
    ]
    if unknown:
        raise InvalidAdapterError(
            f"{path} sets keys lightning-qlora does not know: {describe_names(unknown, 6)}. Known keys: the "
            f"fields of peft.LoraConfig, e.g. {describe_names(sorted(KNOWN_KEYS), 8)}."
        )
    features = [k for k in UNSUPPORTED_FEATURES if config.get(k) not in (None, False, [], {}, "")]
    if features:
        raise InvalidAdapterError(
            f"{path} uses the PEFT feature(s) {features}, which change what the adapter computes and which "
            "lightning-qlora's LoRALinear does not implement."
        )
    _check(path, "r", config.get("r", 8), _positive_int, "a positive integer")
    _check(path, "lora_alpha", config.get("lora_alpha", 8), _positive_finite, "a finite positive number")
    _check(path, "lora_dropout", config.get("lora_dropout", 0.0), _dropout, "a number in [0, 1) or null")
    _check(path, "use_rslora", config.get("use_rslora", False), _bool_or_none, "true or false")
    _check(
        path, "bias", config.get("bias", "none"), _no_bias, '"none" (bias="all"/"lora_only" not supported)'
    )
    for key in ("target_modules", "exclude_modules"):
        _check(path, key, config.get(key), _patterns, "null, a regex string or a list of module names")
        if isinstance(config.get(key), str):
            _compile(path, key, config[key], config[key])
    _check(path, "modules_to_save", config.get("modules_to_save"), _names, "null or a list of module names")
    for key, check, allowed in (
        ("rank_pattern", _positive_int, "positive integers"),
        ("alpha_pattern", _positive_finite, "finite positive numbers"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise InvalidAdapterError(
                f"{path}: {key} must be a JSON object of pattern -> value, got {patterns!r}."
            )
        for pattern, value in patterns.items():
            _check(path, f"{key}[{pattern!r}]", value, check, allowed)
            _compile(path, f"{key} pattern", pattern, rf"(.*\.)?({pattern})$")


def check_adapter_tensors(
    config: Mapping[str, Any],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    full: Mapping[str, torch.Tensor],
    path: Path,
) -> None:
    """Only declared tensors, of a floating dtype, finite, and at least one of them."""
    if not lora and not full:
        raise InvalidAdapterError(f"{path} holds no tensors: an adapter folder needs at least one LoRA pair.")
    named = {f"{m}.lora_A.weight": a for m, (a, _) in lora.items()}
    named |= {f"{m}.lora_B.weight": b for m, (_, b) in lora.items()}
    named |= dict(full)
    wrong_dtype = [f"{k} ({v.dtype})" for k, v in named.items() if v.dtype not in _FLOAT_DTYPES]
    if wrong_dtype:
        raise InvalidAdapterError(
            f"{path} holds tensors of a non-floating dtype: {describe_names(wrong_dtype, 4)}; adapter "
            "weights are float16, bfloat16, float32 or float64."
        )
    saved = [str(m) for m in config.get("modules_to_save") or ()]
    undeclared = sorted(k for k in full if not _inside_any(k.rpartition(".")[0], saved))
    if undeclared:
        raise InvalidAdapterError(
            f"{path} holds {len(undeclared)} tensor(s) that are neither LoRA weights nor inside a "
            f"modules_to_save module ({saved or 'none declared'}): {describe_names(undeclared, 4)}. Loading "
            "them would overwrite the base model's weights; refused."
        )
    targets = config.get("target_modules")
    excluded = config.get("exclude_modules")
    outside = sorted(m for m in lora if not _inside_any(m, saved) and not _targeted(m, targets, excluded))
    if outside:
        raise InvalidAdapterError(
            f"{path} has LoRA weights for {describe_names(outside, 4)}, which its target_modules "
            f"({targets!r}) / exclude_modules ({excluded!r}) do not declare; refused."
        )
    bad = nonfinite_names(named.items())
    if bad:
        raise InvalidAdapterError(
            f"{path} holds NaN or inf in {len(bad)} tensor(s): {describe_names(bad, 4)}."
        )


def check_scaling(
    plan: Mapping[str, tuple[int, float]],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    use_rslora: bool,
    path: Path,
) -> None:
    """Refuse an alpha whose update B @ A * alpha / r can overflow float32 (every logit inf or NaN)."""
    for name, (r, alpha) in plan.items():
        lora_a, lora_b = lora[name]
        scaling = alpha / (math.sqrt(r) if use_rslora else r)
        bound = scaling * r * float(lora_a.abs().max()) * float(lora_b.abs().max())
        if not (math.isfinite(scaling) and scaling < _FLOAT32_MAX and bound < _FLOAT32_MAX):
            raise InvalidAdapterError(
                f"{path}: alpha {alpha!r} at rank {r} scales the update of {name!r} by {scaling:.3g}, which "
                "overflows float32 with these weights (every output would be inf or NaN); refused."
            )


@functools.cache
def _peft_lora_fields() -> frozenset[str]:
    """The installed PEFT's LoraConfig fields (a newer PEFT writes keys this list does not have yet)."""
    try:
        import dataclasses

        from peft import LoraConfig
    except ImportError:
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(LoraConfig))


def _check(path: Path, key: str, value: Any, ok: Any, allowed: str) -> None:
    if not ok(value):
        raise InvalidAdapterError(f"{path}: {key} must be {allowed}, got {value!r}.")


def _compile(path: Path, key: str, pattern: str, regex: str) -> None:
    try:
        re.compile(regex)
    except re.error as err:
        raise InvalidAdapterError(
            f"{path}: {key} {pattern!r} is not a valid regular expression: {err}."
        ) from err


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _dropout(value: Any) -> bool:
    return value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    )


def _bool_or_none(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _no_bias(value: Any) -> bool:
    return value in (None, "none")


def _names(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) and v for v in value))


def _patterns(value: Any) -> bool:
    return isinstance(value, str) or _names(value)


def _inside_any(module: str, names: list[str]) -> bool:
    """True if `module` or one of its parents is named by an entry (PEFT matches names as suffixes)."""
    parts = module.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == n or p.endswith("." + n) for p in prefixes for n in names)


def _targeted(module: str, targets: Any, excluded: Any) -> bool:
    """PEFT's rule: a regex string must match the whole name, a list entry is a name or a dotted suffix."""
    if _matches(module, excluded):
        return False
    return targets is None or _matches(module, targets)


def _matches(module: str, patterns: Any) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return patterns == "all-linear" or re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)
