"""Full (unsharded) state of an FSDP2-sharded QLoRA model, and loading it back into the shards.

Checkpoints of "qlora_fsdp" have the single-process layout: whole tensors under the model's own keys, the
4-bit weights with every quant-state tensor, the optimizer state at the parameters' full shapes. So a
sharded run resumes on another number of processes (or on one), and its adapters are what one process
would have written. Every function here is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer

from lightning_qlora.quantization.layers import is_linear4bit


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a gather for a DTensor), detached, on the CPU."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def full_state_dict(module: nn.Module, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with whole tensors, restricted to the keys `keep` accepts.

    Sharded parameters are gathered one at a time (never the whole model at once). A 4-bit weight comes
    with its quant-state tensors (`weight.absmax`, `weight.quant_map`, ...), which the sharded module's own
    state dict lacks: they live on the module, replicated on every rank.
    """
    quant_states = {
        f"{name}.weight": sub.quant_state
        for name, sub in module.named_modules()
        if is_linear4bit(sub) and getattr(sub, "quant_state", None) is not None
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor) or (keep is not None and not keep(key)):
            continue
        state = quant_states.get(key)
        if state is not None:
            out[key] = full_tensor(value)
            for stat, tensor in state.as_dict(packed=True).items():
                out[f"{key}.{stat}"] = tensor.detach().cpu().clone()
        elif not _is_quant_state_key(key, quant_states):
            out[key] = full_tensor(value)
    return out


def _is_quant_state_key(key: str, quant_states: Mapping[str, Any]) -> bool:
    return any(key.startswith(weight + ".") for weight in quant_states)


def load_full_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy whole tensors into the module's (sharded) parameters and buffers; returns the keys not found.

    Each rank keeps its own rows of a sharded parameter. 4-bit weights and their quant state are not
    loaded: the base is rebuilt from the model, as on a single-device resume, and checked by the LoRA
    callback's fingerprint.
    """
    targets = dict(module.state_dict(keep_vars=True))
    four_bit = {f"{n}.weight" for n, sub in module.named_modules() if is_linear4bit(sub)}
    missing: list[str] = []
    with torch.no_grad():
        for key, value in state_dict.items():
            if key in four_bit or any(key.startswith(w + ".") for w in four_bit):
                continue
            target = targets.get(key)
            if not isinstance(target, torch.Tensor):
                missing.append(key)
                continue
            local_part(target).copy_(value_for(target, value))
    return missing


def local_part(target: torch.Tensor) -> torch.Tensor:
    """The tensor to write into: a DTensor's local shard, or the tensor itself."""
    return target.to_local() if isinstance(target, DTensor) else target


def value_for(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a whole `value` for `target` (the whole of it for a plain tensor)."""
    if not isinstance(target, DTensor):
        return value.to(target.device, target.dtype)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"shape {tuple(value.shape)} in the checkpoint, {tuple(target.shape)} in the model")
    placed = distribute_tensor(
        value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
    )
    return placed.to_local().to(target.device)


def full_optimizer_state(optimizer: Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with each per-element state tensor at its parameter's full shape.

    bitsandbytes' states for a sharded parameter are local tensors (see `fsdp_optim`), nested one level down
    in its state dict; torch's are DTensors. Both are gathered. Block-wise states (8-bit optimizers'
    absmax) cannot be reassembled from shards and are refused.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = optimizer.state_dict()
    for index, entry in saved["state"].items():
        saved["state"][index] = _map_states(entry, functools.partial(_gathered, optimizer, params[index]))
    return saved


def _map_states(
    entry: Mapping[str, Any], convert: Callable[[str, torch.Tensor], torch.Tensor]
) -> dict[str, Any]:
    """A copy of one parameter's optimizer state with `convert` applied to each tensor (nested dicts too)."""
    out: dict[str, Any] = {}
    for name, value in entry.items():
        if isinstance(value, Mapping):
            out[name] = _map_states(value, convert)
        elif isinstance(value, torch.Tensor):
            out[name] = convert(name, value)
        else:
            out[name] = value
    return out


def _gathered(optimizer: Optimizer, param: torch.Tensor, name: str, value: torch.Tensor) -> torch.Tensor:
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if not isinstance(param, DTensor) or value.dim() == 0:
        return value
    if tuple(value.shape) != tuple(param.to_local().shape):
        raise ValueError(
            f"{type(optimizer).__name__} keeps a state {name!r} of shape {tuple(value.shape)} for a "
            f"parameter shard of shape {tuple(param.to_local().shape)}: block-wise states cannot be "
            "gathered. Use a 32-bit optimizer (paged_adamw or adamw) with qlora_fsdp."
        )
    whole = DTensor.from_local(
        value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )
    return whole.full_tensor().cpu()


def load_full_optimizer_state(optimizer: Optimizer, saved: Mapping[str, Any]) -> None:
    """Load a `full_optimizer_state` (or a single-process optimizer state) into a sharded optimizer."""
    from lightning_qlora.strategies.fsdp_optim import is_bitsandbytes_optimizer

    params = [p for group in optimizer.param_groups for p in group["params"]]
    local_states = is_bitsandbytes_optimizer(optimizer)

    def shard(param: torch.Tensor, _name: str, value: torch.Tensor) -> torch.Tensor:
        if not isinstance(param, DTensor) or value.shape != param.shape:
            return value
        placed = distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
        return placed.to_local() if local_states else placed

    state = {
        index: _map_states(entry, functools.partial(shard, params[int(index)]))
        for index, entry in saved["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


@contextmanager
def gathered_parameters(module: nn.Module, names: set[str]) -> Iterator[None]:
    """Inside the block, the named sharded parameters are whole plain Parameters (on every rank).

    For writing what was trained (the PEFT export) with code that reads `module.named_parameters()`; the
    shards are registered again when the block ends.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, param in list(module.named_parameters()):
            if name not in names or not isinstance(param, DTensor):
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            whole = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
            owner._parameters[leaf] = whole
            swapped.append((owner, leaf, param))
        yield
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param


@contextmanager
def whole_trainable_parameters(strategy: object, module: nn.Module) -> Iterator[None]:
    """Under a strategy that shards the model ("qlora_fsdp"), the trainable parameters are whole inside the
    block (a collective: every rank enters it); under any other strategy, nothing happens."""
    if not getattr(type(strategy), "shards_4bit_weights", False):
        yield
        return
    names = {name for name, param in module.named_parameters() if param.requires_grad}
    with gathered_parameters(module, names):
        yield
