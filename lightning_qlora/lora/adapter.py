"""The adapter protocol: what freezing, checkpoint filtering, PEFT export and merging need of an adapter.

As in torchtune's `modules/peft`, adapters are found by what they can do, never by class or parameter
names: a layer that wraps a `base_layer`, names its trainable parameters, computes its delta weight and
says how PEFT stores it is an adapter. `LoRALinear` is one; a variant with another parameter (DoRA's
magnitude vector, say) is a new class implementing the same methods, and every function here, the
callback, the exporter and the merge handle it without change. Registering it (`lora.variants`) is what
lets injection build it by name and the PEFT loader rebuild it from a folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_qlora.quantization.layers import KEEP_FULL_PRECISION_ATTR


@runtime_checkable
class AdapterModule(Protocol):
    """A layer that adds a trainable update to a frozen `base_layer`.

    Attributes:
        base_layer: the wrapped layer (full precision or 4-bit); its weight is what a merge changes.
        r, alpha, scaling: rank, scale numerator and the factor the update is multiplied by.
        merged: whether the update is currently folded into the base weight.
    """

    base_layer: nn.Module
    r: int
    alpha: float
    scaling: float
    merged: bool

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters training updates, by their name inside this module (`lora_A`, `lora_B`)."""
        ...

    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's layout, in float32: merged weight = base + delta."""
        ...

    def peft_config_fields(self) -> dict[str, Any]:
        """Fields of PEFT's `adapter_config.json` this adapter sets, besides r and alpha (`lora_dropout`,
        and a variant's flag such as `use_dora`)."""
        ...

    def peft_tensor_names(self) -> dict[str, str]:
        """Parameter name -> the key suffix PEFT stores it under (`lora_A` -> `lora_A.weight`)."""
        ...

    def merge(self) -> None:
        """Fold the update into a full-precision base weight in place."""
        ...

    def unmerge(self) -> None:
        """Take a merged update back out of the base weight."""
        ...


def is_adapter(module: object) -> bool:
    """True for a module that implements `AdapterModule`."""
    return isinstance(module, nn.Module) and isinstance(module, AdapterModule)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Every adapter in `model` with its module path, found through the protocol."""
    for name, module in model.named_modules():
        if is_adapter(module):
            yield name, module


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter of `model` by its full name (`layers.0.q_proj.lora_A`)."""
    params: dict[str, nn.Parameter] = {}
    for name, adapter in adapter_modules(model):
        for key, param in adapter.adapter_params().items():
            params[f"{name}.{key}" if name else key] = param
    return params


def set_trainable_params(model: nn.Module) -> None:
    """Freeze every parameter except the adapters' and those of modules kept for full training."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in adapter_params(model).values():
        param.requires_grad_(True)
    for module in model.modules():
        if getattr(module, KEEP_FULL_PRECISION_ATTR, False):
            for param in module.parameters():
                if param.is_floating_point():
                    param.requires_grad_(True)
