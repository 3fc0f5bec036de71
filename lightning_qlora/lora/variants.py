"""Adapter variants by name: what plain LoRA, DoRA and any new kind of adapter register, once.

A variant is a layer class implementing the adapter protocol (`lora.adapter.AdapterModule`) plus one
`register_variant` call saying what the rest of the package needs to know of it: which class injection
builds for `LoRAConfig(variant=...)`, which `adapter_config.json` fields mark a PEFT folder as holding it,
the tensors it stores beside A and B, and whether LoftQ and shared sibling inputs apply. Injection, the
PEFT exporter and loader, LoftQ and `LoRAConfig` ask this registry, so a new variant touches no other
module (docs/configuration.md, "Adding an adapter variant").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from lightning_qlora.lora.dora import DORA_PEFT_FIELDS, MAGNITUDE, DoRALinear
from lightning_qlora.lora.layer import LoRALinear

# What the protocol asks of a layer class; checked at registration so a wrong class fails there, not in
# the middle of an export.
_PROTOCOL_METHODS = (
    "adapter_params", "delta_weight", "peft_config_fields", "peft_tensor_names", "merge", "unmerge",
)  # fmt: skip


class UnknownVariantError(ValueError):
    """A variant name that no registered variant has."""


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor a variant stores beside A and B in a PEFT adapter file (DoRA's magnitude vector).

    Attributes:
        key: its key suffix after the module path in `adapter_model.safetensors`, which is also its name in
            the layer's `adapter_params()` (PEFT's own names, e.g. `lora_magnitude_vector`).
        label: what error messages call it ("magnitude").
        shape: its shape from the layer's (in_features, out_features, r), checked before loading.
    """

    key: str
    label: str
    shape: Callable[[int, int, int], tuple[int, ...]]


@dataclass(frozen=True)
class AdapterVariant:
    """One kind of adapter, as the package sees it.

    Attributes:
        name: what `LoRAConfig(variant=...)` and `lora.variant=` on the command line take.
        title: how messages name it ("plain LoRA", "DoRA").
        layer_class: built by injection as `layer_class(base, r=, alpha=, dropout=, scaling=, dtype=)`.
        peft_fields: `adapter_config.json` fields that mark a folder as this variant (`{"use_dora": True}`);
            empty for plain LoRA, the variant a folder holds when no other's fields are set.
        extra_tensors: tensors stored beside A and B, loaded into `adapter_params()` under the same name.
        supports_loftq: whether `init="loftq"` may start this variant.
        shares_sibling_input: whether the layer can read a shared input (`share_sibling_input=True`).
        base_replaced: called after LoftQ swapped the layer's base for its 4-bit start (DoRA recomputes its
            magnitude from the new base).
        tensors_loaded: called after an adapter file's tensors were copied into the layer (DoRA keeps the
            loaded magnitude instead of recomputing it).
    """

    name: str
    title: str
    layer_class: type[nn.Module]
    peft_fields: Mapping[str, Any] = field(default_factory=dict)
    extra_tensors: tuple[ExtraTensor, ...] = ()
    supports_loftq: bool = True
    shares_sibling_input: bool = False
    base_replaced: Callable[[nn.Module], None] | None = None
    tensors_loaded: Callable[[nn.Module], None] | None = None

    def peft_marker(self) -> str:
        """The fields that mark a folder as this variant, as `adapter_config.json` writes them."""
        return ", ".join(f"{key}: {_json_literal(value)}" for key, value in self.peft_fields.items())


_REGISTRY: dict[str, AdapterVariant] = {}


def register_variant(variant: AdapterVariant) -> AdapterVariant:
    """Make `variant` available by name to `LoRAConfig`, injection, PEFT export/import and LoftQ.

    Refused (nothing registered): a name already taken, a layer class that is not an `nn.Module`
    implementing the adapter protocol, extra-tensor keys without PEFT's `lora_` prefix, PEFT fields or
    extra-tensor keys another variant already uses (a folder would not say which variant it holds).
    """
    if not isinstance(variant, AdapterVariant):
        raise TypeError(f"register_variant takes an AdapterVariant, got {type(variant).__name__}.")
    if not isinstance(variant.name, str) or not variant.name.isidentifier():
        raise ValueError(
            f"An adapter variant's name must be an identifier such as 'dora', got {variant.name!r}."
        )
    if variant.name in _REGISTRY:
        raise ValueError(
            f"An adapter variant named {variant.name!r} is already registered "
            f"({_REGISTRY[variant.name].title}); registered: {', '.join(variant_names())}."
        )
    cls = variant.layer_class
    missing = [m for m in _PROTOCOL_METHODS if not callable(getattr(cls, m, None))]
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or missing:
        raise TypeError(
            f"Adapter variant {variant.name!r}: layer_class must be an nn.Module class implementing the "
            f"adapter protocol (lightning_qlora.lora.AdapterModule); {getattr(cls, '__name__', cls)!r} lacks "
            f"{missing or 'nn.Module'}."
        )
    unprefixed = [spec.key for spec in variant.extra_tensors if not spec.key.startswith("lora_")]
    if unprefixed:  # PEFT's naming; anything else could be a module's own tensor in modules_to_save
        raise ValueError(
            f"Adapter variant {variant.name!r}: extra tensor keys must start with 'lora_' as PEFT's do "
            f"(lora_magnitude_vector), got {unprefixed}."
        )
    for other in _REGISTRY.values():
        if dict(other.peft_fields) == dict(variant.peft_fields):
            raise ValueError(
                f"Adapter variant {variant.name!r} marks PEFT folders with the same fields as {other.name!r} "
                f"({dict(variant.peft_fields) or 'none'}); give it a field of its own."
            )
        shared = {t.key for t in other.extra_tensors} & {t.key for t in variant.extra_tensors}
        if shared:
            raise ValueError(
                f"Adapter variant {variant.name!r} stores tensors under keys {other.name!r} uses: "
                f"{sorted(shared)}."
            )
    _REGISTRY[variant.name] = variant
    return variant


def unregister_variant(name: str) -> None:
    """Remove a variant registered with `register_variant` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"The built-in adapter variant {name!r} cannot be unregistered.")
    get_variant(name)
    del _REGISTRY[name]


def variant_names() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_variant(name: str) -> AdapterVariant:
    """The variant registered as `name`; an error listing the registered names if there is none."""
    variant = _REGISTRY.get(name) if isinstance(name, str) else None
    if variant is None:
        raise UnknownVariantError(
            f"Unknown LoRA variant {name!r}; registered variants: {', '.join(variant_names())}. A new one is "
            "added with lightning_qlora.lora.variants.register_variant."
        )
    return variant


def all_variants() -> tuple[AdapterVariant, ...]:
    return tuple(_REGISTRY[name] for name in variant_names())


def variant_of(layer: object) -> AdapterVariant:
    """The variant of an adapter layer: that of the nearest registered class in its class hierarchy.

    An adapter of an unregistered class that derives from none (a protocol implementation of its own) is
    taken as plain LoRA: A and B are all a PEFT folder can hold of it.
    """
    by_class = {variant.layer_class: variant for variant in _REGISTRY.values()}
    for cls in type(layer).__mro__:
        if cls in by_class:
            return by_class[cls]
    return _REGISTRY[LORA.name]


def _json_literal(value: object) -> str:
    return json.dumps(value)


def _dora_base_replaced(layer: nn.Module) -> None:
    layer.magnitude_pending = True  # type: ignore[assignment]  # the magnitude follows the new base


def _dora_tensors_loaded(layer: nn.Module) -> None:
    layer.magnitude_pending = False  # type: ignore[assignment]  # a loaded magnitude is final


LORA = register_variant(
    AdapterVariant(name="lora", title="plain LoRA", layer_class=LoRALinear, shares_sibling_input=True)
)
DORA = register_variant(
    AdapterVariant(
        name="dora",
        title="DoRA",
        layer_class=DoRALinear,
        peft_fields=MappingProxyType(DORA_PEFT_FIELDS),
        extra_tensors=(ExtraTensor(MAGNITUDE, "magnitude", lambda in_f, out_f, r: (out_f,)),),
        base_replaced=_dora_base_replaced,
        tensors_loaded=_dora_tensors_loaded,
    )
)
_BUILT_IN = frozenset({LORA.name, DORA.name})
