"""Handing FSDP2 parameters that are already sharded (`load_quantized(..., shard=mesh)`) without a gather.

`fully_shard` takes whole parameters and keeps this process's rows of them. A model loaded rank-aware
holds only those rows already (DTensors sharded on dim 0), so each is swapped for a meta placeholder of
its whole shape while `fully_shard` builds the unit's layout, then the placeholder FSDP2 registered is
replaced by the loaded rows on FSDP2's own mesh and placements. FSDP2 takes the new tensors over (and
pads the last process's rows) at its lazy initialisation, before the first gather: its documented path
for parameters that change after `fully_shard` (`load_state_dict(assign=True)`, meta-device init).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_qlora.quantization.row_shards import is_row_shard


@contextmanager
def adopting_row_shards(
    modules: Iterable[nn.Module], mesh_size: int, device: torch.device, owner: str
) -> Iterator[None]:
    """Around one `fully_shard` call: the row-sharded parameters of `modules` (their own, not recursing)
    are meta placeholders inside the block and the loaded rows again after it."""

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    placeholders: dict[int, nn.Parameter] = {}
    try:
        for module in modules:
            for leaf, param in list(module._parameters.items()):
                if param is None or not is_row_shard(param):
                    continue
                _check_loaded(param, module, mesh_size, device, owner)
                if id(param) not in placeholders:  # a shared (tied) parameter gets one placeholder
                    whole = torch.empty(param.shape, dtype=param.dtype, device="meta")
                    placeholders[id(param)] = nn.Parameter(whole, requires_grad=param.requires_grad)
                module._parameters[leaf] = placeholders[id(param)]
                swapped.append((module, leaf, param))
        yield
    finally:
        adopted: dict[int, nn.Parameter] = {}
        for module, leaf, loaded in swapped:
            if id(loaded) not in adopted:
                adopted[id(loaded)] = _on_fsdp_layout(module._parameters[leaf], loaded)
            module._parameters[leaf] = adopted[id(loaded)]


def _check_loaded(
    param: torch.Tensor, module: nn.Module, mesh_size: int, device: torch.device, owner: str
) -> None:
    """Shards loaded for another number of processes, or on another device, are refused before sharding."""
    from torch.distributed.tensor import DTensor

    assert isinstance(param, DTensor)
    where = f"{owner}: a parameter of {type(module).__name__} was loaded"
    if param.device_mesh.size() != mesh_size:
        raise ValueError(
            f"{where} sharded over {param.device_mesh.size()} process(es), but the strategy shards over "
            f"{mesh_size}; load with shard=self.device_mesh in configure_model."
        )
    if param.device != device:
        raise ValueError(
            f"{where} on {param.device}, but this process trains on {device}; pass that device to "
            "load_quantized(device=...)."
        )


def _on_fsdp_layout(registered: nn.Parameter | None, loaded: nn.Parameter) -> nn.Parameter:
    """`loaded`'s rows as a parameter on the mesh and placements FSDP2 registered for it."""
    from torch.distributed.tensor import DTensor

    if not isinstance(registered, DTensor):  # no fully_shard in the block (or it failed): the rows back
        return loaded
    if tuple(registered.shape) != tuple(loaded.shape) or registered.placements != loaded.placements:
        raise ValueError(
            f"FSDP2 sharded a parameter of shape {tuple(registered.shape)} as {registered.placements}; "
            f"it was loaded as {tuple(loaded.shape)} {loaded.placements}."
        )
    assert isinstance(loaded, DTensor)
    rows = DTensor.from_local(
        loaded.to_local(),
        registered.device_mesh,
        registered.placements,
        run_check=False,
        shape=registered.shape,
        stride=registered.stride(),
    )
    return nn.Parameter(rows, requires_grad=loaded.requires_grad)
