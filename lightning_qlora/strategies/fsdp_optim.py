"""bitsandbytes' optimizers over FSDP2's sharded parameters: each process steps its own shard.

FSDP2 registers each parameter as a `DTensor` holding this process's rows. torch's AdamW knows DTensors;
bitsandbytes' kernels do not (no sharding rule for its ops), and its paged state buffers would be made at
the parameter's global size. The optimizer is therefore switched to a subclass that hands bitsandbytes the
local shard (a plain tensor view of the same storage) and its local gradient: the update is elementwise, so
stepping shards is stepping the whole. State stays keyed by the registered parameter, so Lightning, the
checkpoints and `state_dict` see the parameters they know.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer


def is_bitsandbytes_optimizer(optimizer: Optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes.")


def shard_local_steps(optimizer: Optimizer) -> Optimizer:
    """Make a bitsandbytes optimizer step the local shards of DTensor parameters (in place; returns it)."""
    if is_bitsandbytes_optimizer(optimizer) and not isinstance(optimizer, _ShardLocalSteps):
        optimizer.__class__ = _sharded_class(type(optimizer))
    return optimizer


_SHARDED_CLASSES: dict[type, type] = {}


def _sharded_class(cls: type[Optimizer]) -> type[Optimizer]:
    """One subclass per optimizer class, named like it (logs and checkpoints show the familiar name)."""
    if cls not in _SHARDED_CLASSES:
        _SHARDED_CLASSES[cls] = type(cls.__name__, (_ShardLocalSteps, cls), {"__module__": cls.__module__})
    return _SHARDED_CLASSES[cls]


class _ShardLocalSteps:
    """Put before a bitsandbytes optimizer class: `init_state` and `update_step` see local shards."""

    state: Any

    def init_state(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
        with _local(self, p) as local:
            super().init_state(group, local, gindex, pindex)  # type: ignore[misc]

    def update_step(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
        with _local(self, p) as local:
            super().update_step(group, local, gindex, pindex)  # type: ignore[misc]


@contextmanager
def _local(optimizer: Any, p: torch.Tensor) -> Iterator[torch.Tensor]:
    """`p`'s local shard with its local gradient; the optimizer state is moved under it and back."""
    if not isinstance(p, DTensor):
        yield p
        return
    local = p.to_local()
    grad = p.grad
    if grad is not None:
        local.grad = grad.to_local() if isinstance(grad, DTensor) else grad
    if p in optimizer.state:
        optimizer.state[local] = optimizer.state.pop(p)
    try:
        yield local
    finally:
        optimizer.state[p] = optimizer.state.pop(local)
        local.grad = None
