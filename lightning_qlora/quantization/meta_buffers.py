"""Non-persistent buffers of a model built on the meta device, which no checkpoint holds.

`with torch.device("meta"): model = AutoModelForCausalLM.from_config(config)` leaves every tensor on meta,
including buffers registered with `persistent=False`: a Llama's rotary `inv_freq`, a BERT's
`position_ids`. They are computed in `__init__` and never saved, so loading a checkpoint cannot fill them.
`restore_non_persistent_buffers` recomputes them by building the same class again from the model's config
with its parameters on meta (no weight memory) and its buffers real, as
`accelerate.init_empty_weights(include_buffers=False)` does, and copies them over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_qlora._names import describe_names, logical_name


class MetaBufferError(KeyError):
    """A buffer that no checkpoint holds is still on the meta device and cannot be recomputed here."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on meta but their buffers real (computed as usual)."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is None or param.device.type == "meta":
            return
        if type(param) is nn.Parameter:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        else:  # a subclass keeps its attributes (accelerate does the same)
            kwargs = {**param.__dict__, "requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_non_persistent_buffers(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Names (among `names`, or all) of the model's non-persistent buffers that are still on meta."""
    wanted = set(names) if names is not None else None
    found = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf in module._non_persistent_buffers_set:
            buffer = module._buffers.get(leaf)
            name = f"{module_name}.{leaf}" if module_name else leaf
            if buffer is not None and buffer.device.type == "meta" and (wanted is None or name in wanted):
                found.append(name)
    return found


def restore_non_persistent_buffers(
    model: nn.Module, names: Iterable[str], device: torch.device | str = "cpu"
) -> list[str]:
    """Recompute the non-persistent buffers among `names` that are on meta; returns the names restored."""
    lost = meta_non_persistent_buffers(model, names)
    if not lost:
        return []
    fresh = dict(_rebuilt(model, lost).named_buffers(remove_duplicate=False))
    for name in lost:
        value = fresh.get(logical_name(name))
        if value is None or value.device.type == "meta":
            raise MetaBufferError(
                f"The non-persistent buffer {name!r} is on the meta device and rebuilding "
                f"{type(model).__name__} from its config did not produce it. {_FIX}"
            )
        module_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        owner._buffers[leaf] = value.to(device)
    return lost


_FIX = (
    "Build the model with its parameters on meta but its buffers real, e.g. "
    "`with lightning_qlora.quantization.meta_buffers.parameters_on_meta(): model = ...` (or accelerate's "
    "`init_empty_weights(include_buffers=False)`), instead of under `torch.device('meta')`."
)


def _rebuilt(model: nn.Module, lost: list[str]) -> nn.Module:
    """The same class built again from the model's config, parameters on meta, buffers computed."""
    config = getattr(model, "config", None)
    if config is None:
        raise MetaBufferError(
            f"{type(model).__name__} was built on the meta device, and its non-persistent buffers "
            f"{describe_names(lost, 4)} are in no checkpoint; without a `config` attribute they cannot be "
            f"recomputed. {_FIX}"
        )
    build: Any = getattr(type(model), "_from_config", None) or type(model)
    with parameters_on_meta(), torch.device("cpu"):
        return build(config)
