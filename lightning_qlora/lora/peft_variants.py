"""A PEFT adapter folder's variant: which registered variant its config marks, and the tensors that variant
stores beside A and B (DoRA's magnitudes), split off, checked before the model is touched, and loaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora._names import describe_names
from lightning_qlora.lora.peft_checks import InvalidAdapterError
from lightning_qlora.lora.variants import LORA, AdapterVariant, ExtraTensor, all_variants

ExtraTensors = dict[str, dict[str, torch.Tensor]]
"""Extra-tensor key (`lora_magnitude_vector`) -> module path -> tensor."""


def folder_variant(peft_config: Mapping[str, Any], folder: Path) -> AdapterVariant:
    """The variant whose `peft_fields` the config sets (plain LoRA when it sets none)."""
    marked = [
        variant
        for variant in all_variants()
        if variant.peft_fields and all(peft_config.get(k) == v for k, v in variant.peft_fields.items())
    ]
    if len(marked) > 1:
        raise InvalidAdapterError(
            f"{folder}'s adapter_config.json marks more than one adapter variant: "
            f"{'; '.join(f'{v.title} ({v.peft_marker()})' for v in marked)}. Set the fields of one."
        )
    return marked[0] if marked else LORA


def split_extra_tensors(
    weights: Mapping[str, torch.Tensor], prefix: str
) -> tuple[dict[str, torch.Tensor], ExtraTensors]:
    """The tensors of an adapter file without any registered variant's extra tensors, and those by key and
    module path (PEFT stores them as `<prefix><module path>.<key>`, DoRA's without `.weight`)."""
    keys = {spec.key for variant in all_variants() for spec in variant.extra_tensors}
    rest: dict[str, torch.Tensor] = {}
    extras: ExtraTensors = {}
    for key, value in weights.items():
        module, _, last = key.removeprefix(prefix).rpartition(".")
        if module and last in keys:
            extras.setdefault(last, {})[module] = value
        else:
            rest[key] = value
    return rest, extras


def check_extra_tensors(
    extras: ExtraTensors,
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    variant: AdapterVariant,
    folder: Path,
) -> None:
    """Exactly the folder variant's extra tensors: one finite float tensor of the right shape per LoRA pair,
    and none of another variant's."""
    own = {spec.key for spec in variant.extra_tensors}
    for key, tensors in extras.items():
        if key not in own:
            owner, spec = _owner(key)
            raise InvalidAdapterError(
                f"{folder} holds {owner.title} {spec.label} tensors ({describe_names(sorted(tensors), 3)}) "
                f"but its adapter_config.json does not set {owner.peft_marker()}."
            )
    for spec in variant.extra_tensors:
        _check_one_kind(spec, extras.get(spec.key, {}), lora, variant, folder)


def _check_one_kind(
    spec: ExtraTensor,
    values: Mapping[str, torch.Tensor],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    variant: AdapterVariant,
    folder: Path,
) -> None:
    missing = sorted(set(lora) - set(values))
    stray = sorted(set(values) - set(lora))
    if missing or stray:
        detail = f"without a {spec.label}: {describe_names(missing, 3)}" if missing else ""
        detail += "; " if missing and stray else ""
        detail += f"{spec.label}s without a LoRA pair: {describe_names(stray, 3)}" if stray else ""
        raise InvalidAdapterError(f"{folder} sets {', '.join(variant.peft_fields)}, but {detail}.")
    bad = []
    for name, value in values.items():
        lora_a, lora_b = lora[name]
        expected = spec.shape(int(lora_a.shape[-1]), int(lora_b.shape[0]), int(lora_a.shape[0]))
        if not value.is_floating_point() or tuple(value.shape) != expected:
            bad.append(f"{name!r}: {value.dtype} {tuple(value.shape)}, expected {expected}")
        elif not bool(torch.isfinite(value).all()):
            bad.append(f"{name!r}: non-finite values")
    if bad:
        detail = "; ".join(bad[:4])
        raise InvalidAdapterError(f"{folder} has invalid {variant.title} {spec.label}s: {detail}.")


def load_extra_tensors(layer: nn.Module, variant: AdapterVariant, name: str, extras: ExtraTensors) -> None:
    """Copy module `name`'s extra tensors from a checked folder into its layer (of `variant`)."""
    params = layer.adapter_params()  # type: ignore[operator]
    with torch.no_grad():
        for spec in variant.extra_tensors:
            params[spec.key].copy_(extras[spec.key][name])
    if variant.tensors_loaded is not None:
        variant.tensors_loaded(layer)


def _owner(key: str) -> tuple[AdapterVariant, ExtraTensor]:
    for variant in all_variants():
        for spec in variant.extra_tensors:
            if spec.key == key:
                return variant, spec
    raise KeyError(key)
