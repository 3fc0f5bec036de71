"""What an adapter-only checkpoint needs to resume exactly: the same frozen base, quantized the same way.

Adapter-only checkpoints hold no base weights, so resuming one onto another base model (another
checkpoint, another revision) or without `QLoRAPrecision` would load without an error and train on,
wrongly. The `LoRA` callback records a fingerprint of the frozen base and the precision setup in every
checkpoint and refuses a resume where either differs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

CHECKPOINT_KEY = "lightning_qlora_base"
_SAMPLES_PER_TENSOR = 1024


class ResumeMismatchError(ValueError):
    """A checkpoint was written with another base model or another precision setup than this run's."""


def base_fingerprint(module: nn.Module) -> str:
    """A hash of the frozen parameters' names, shapes, dtypes and an evenly spaced sample of their values.

    A sample keeps this cheap for a 70B model (a few thousand values per tensor) while any other checkpoint
    of the same architecture differs in it. Computed before the precision plugin quantizes the model.
    """
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        if param.device.type == "meta" or param.numel() == 0:
            continue
        digest.update(_sample_bytes(param.detach()))
    return digest.hexdigest()


def _sample_bytes(param: torch.Tensor) -> bytes:
    """The bytes of every `numel // 1024`-th value, the first 1024 of them; the same for a parameter split by
    rows between processes (`load_quantized(shard=...)`), whose samples are summed from the processes that
    hold them (a collective, as `inject` runs on every process)."""
    from lightning_qlora.quantization.row_shards import is_row_shard, row_range

    step = max(1, param.numel() // _SAMPLES_PER_TENSOR)
    if not is_row_shard(param):
        sample = param.reshape(-1)[::step][:_SAMPLES_PER_TENSOR].to("cpu").contiguous()
        return bytes(sample.view(torch.uint8).numpy().tobytes())
    import torch.distributed as dist

    mesh = param.device_mesh  # type: ignore[attr-defined]
    local = param.to_local()  # type: ignore[attr-defined]
    row = math.prod(param.shape[1:])
    first, stop = row_range(param.shape[0], mesh.get_local_rank(), mesh.size())
    wanted = torch.arange(0, param.numel(), step, device=local.device)[:_SAMPLES_PER_TENSOR]
    mine = (wanted >= first * row) & (wanted < stop * row)
    sample = torch.zeros(wanted.numel(), dtype=param.dtype, device=local.device)
    sample[mine] = local.reshape(-1)[wanted[mine] - first * row]
    summed = sample.view(torch.uint8).to(torch.int32)  # each byte from one process, zeros from the others
    dist.all_reduce(summed, group=mesh.get_group())
    return bytes(summed.to(torch.uint8).cpu().numpy().tobytes())


def precision_setup(trainer: pl.Trainer) -> dict[str, Any]:
    """The precision plugin's class and, for `QLoRAPrecision`, its quantization settings."""
    plugin = trainer.precision_plugin
    config = getattr(plugin, "config", None)
    settings = asdict(config) if is_dataclass(config) and not isinstance(config, type) else {}
    keep = ("quant_type", "blocksize", "double_quant")
    return {"plugin": type(plugin).__name__, **{k: str(v) for k, v in settings.items() if k in keep}}


def optimizer_setup(trainer: pl.Trainer) -> str | None:
    """The optimizer a QLoRA strategy builds (its canonical name); None for the module's own optimizer."""
    strategy = trainer.strategy
    config = getattr(strategy, "optimizer_config", None)
    name = getattr(config, "name", None)
    if not isinstance(name, str):
        return None
    if getattr(strategy, "_user_configure_optimizers", False) and not getattr(
        strategy, "force_optimizer", False
    ):
        return None  # the LightningModule's configure_optimizers builds it: not ours to compare
    return {"paged_adamw_32bit": "paged_adamw"}.get(name, name)


def resume_record(fingerprint: str | None, trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "base_fingerprint": fingerprint,
        "precision": precision_setup(trainer),
        "optimizer": optimizer_setup(trainer),
    }


def check_resume(saved: Mapping[str, Any] | None, fingerprint: str | None, trainer: pl.Trainer) -> None:
    """Refuse to resume a checkpoint written on another base or with another precision setup."""
    if not saved:
        return  # written before the record existed
    then, now = saved.get("precision") or {}, precision_setup(trainer)
    if then and then != now:
        raise ResumeMismatchError(
            f"The checkpoint was written with precision {then} and this run has {now}: its adapters were "
            "trained on a base stored that way. Resume with the same precision plugin (e.g. "
            "`plugins=[QLoRAPrecision()]`, or the same `precision=` option of the command)."
        )
    optimizer_then, optimizer_now = saved.get("optimizer"), optimizer_setup(trainer)
    if optimizer_then and optimizer_now and optimizer_then != optimizer_now:
        raise ResumeMismatchError(
            f"The checkpoint holds {optimizer_then}'s optimizer state and this run builds {optimizer_now}: "
            "the state does not carry over (it fails to load, or loads as the wrong kind and trains on "
            "silently). "
            f"Resume with the checkpoint's optimizer (optimizer={optimizer_then}, or "
            f"OptimizerConfig(name={optimizer_then!r})), or start a new run from the exported adapters."
        )
    before = saved.get("base_fingerprint")
    if before and fingerprint and before != fingerprint:
        raise ResumeMismatchError(
            "The checkpoint's adapters were trained on other base weights than this model's (fingerprint "
            f"{before[:12]} in the checkpoint, {fingerprint[:12]} now): resuming would continue training on "
            "another model. Load the same base model (same checkpoint and revision) to resume."
        )
