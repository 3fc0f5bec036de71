"""Keeping only this process's rows of a tensor while loading, laid out as FSDP2 will shard it.

`load_quantized(..., shard=mesh)` quantizes each linear weight whole (its block statistics need every
value) and then keeps only the rows of the packed bytes that FSDP2 gives this process, as a `DTensor`
sharded on dim 0 over the mesh; the other parameters likewise. No collective is needed: every process
reads the same file and computes its own rows, so no process holds the whole 4-bit model, only one
layer's packed bytes at a time. `QLoRAFSDPStrategy` then adopts these shards as they are.

FSDP2's row split is `torch.chunk`'s: ceil(rows / N) rows per process, the last ones shorter or empty.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

DATA_PARALLEL = "data_parallel"  # the mesh dimension Lightning's ModelParallelStrategy shards over


def shard_mesh(mesh: Any, device: torch.device) -> Any:
    """The 1-D mesh to shard over: `mesh` itself, or the "data_parallel" dimension of Lightning's 2-D mesh
    (`LightningModule.device_mesh` under "qlora_fsdp", whose other dimension has size 1)."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"load_quantized shard= takes a torch DeviceMesh (e.g. the LightningModule's `self.device_mesh` "
            f"under strategy='qlora_fsdp'), got {type(mesh).__name__}."
        )
    if mesh.ndim > 1:
        names = mesh.mesh_dim_names or ()
        others = [size for name, size in zip(names, mesh.shape, strict=True) if name != DATA_PARALLEL]
        if DATA_PARALLEL not in names or math.prod(others) != 1:
            raise ValueError(
                f"load_quantized shard=: a {mesh.ndim}-D mesh {dict(zip(names, mesh.shape, strict=True))} "
                f"can only be used through a {DATA_PARALLEL!r} dimension with every other dimension of size "
                "1 (qlora_fsdp shards every layer over all processes); pass a 1-D mesh."
            )
        mesh = mesh[DATA_PARALLEL]
    if mesh.device_type != device.type:
        raise ValueError(
            f"load_quantized shard=: the mesh is on {mesh.device_type!r} but device={str(device)!r}; load "
            "onto the mesh's device type (the shards stay where they are when the strategy adopts them)."
        )
    return mesh


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[first, stop) of the rows `rank` keeps: FSDP2's (torch.chunk's) split of dim 0."""
    per = -(-rows // world) if rows else 0
    first = min(rank * per, rows)
    return first, min(first + per, rows)


def keep_rows(tensor: torch.Tensor, mesh: Any, requires_grad: bool = False) -> nn.Parameter:
    """A parameter holding only this process's rows of `tensor` (a copy, so the whole can be freed); a
    scalar has no rows and stays whole."""
    from torch.distributed.tensor import DTensor, Shard

    if tensor.dim() == 0:
        return nn.Parameter(tensor.detach(), requires_grad=requires_grad)

    first, stop = row_range(tensor.shape[0], mesh.get_local_rank(), mesh.size())
    local = tensor.detach().narrow(0, first, stop - first).clone()
    sharded = DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=tensor.shape, stride=tensor.stride()
    )
    return nn.Parameter(sharded, requires_grad=requires_grad)


def is_row_shard(param: torch.Tensor) -> bool:
    """A parameter `keep_rows` made (or any DTensor sharded on dim 0 of a 1-D mesh)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return False
    return param.device_mesh.ndim == 1 and tuple(param.placements) == (Shard(0),)
