"""`QLoRADDPStrategy`: the QLoRA recipe over several processes with DistributedDataParallel."""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import _augment_message
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_qlora._settings import check_bool
from lightning_qlora.strategies.hook import ActivationCheckpointing, _PagedOptimizerMixin
from lightning_qlora.strategies.optim import OPTIMIZER_FIELDS, OptimizerConfig, StrategySettings

_DEFAULTS = StrategySettings()


class QLoRADDPStrategy(_PagedOptimizerMixin, DDPStrategy):
    """Lightning's DDP strategy plus the QLoRA recipe: each process holds the 4-bit base and the adapters.

    `Trainer(devices=N, plugins=[QLoRAPrecision()], callbacks=[LoRA()], strategy="qlora_ddp")`. DDP
    all-reduces only parameters that require grad, so the frozen 4-bit base never travels: each step
    exchanges the adapters' gradients only. gloo is used on CPU, NCCL on CUDA (Lightning's choice).
    Checkpoints and adapter exports are written by rank 0 only.

    Args:
        optimizer, force_optimizer, max_grad_norm, activation_checkpointing: as for `QLoRAStrategy`; fields
            of `OptimizerConfig` given as keywords (`lr=1e-3`) are built into it as there.
        find_unused_parameters: DDP's; False (the default) is right when every adapter takes part in each
            step's loss. Set True (or use "qlora_ddp_find_unused_parameters_true") for models that skip
            branches.
        broadcast_buffers: DDP's per-forward broadcast of rank 0's buffers. Off by default: the buffers of a
            frozen base (rotary tables, masks) are constants, already equal on all ranks after DDP's initial
            sync. Turn it on for trained buffers such as BatchNorm statistics in `modules_to_save`.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, timeout, start_method, **kwargs: as for Lightning's `DDPStrategy`; keyword
            arguments that are not `OptimizerConfig` fields go to `DistributedDataParallel`. With a
            start_method other than "popen" the module in the launching process does not get the adapters
            back (a warning says so), which is why no "qlora_ddp_spawn" name is registered.
    """

    strategy_name = "qlora_ddp"

    def __init__(
        self,
        optimizer: OptimizerConfig | dict[str, Any] | None = None,
        force_optimizer: bool = _DEFAULTS.force_optimizer,
        max_grad_norm: float | None = _DEFAULTS.max_grad_norm,
        activation_checkpointing: ActivationCheckpointing = None,
        find_unused_parameters: bool = False,
        broadcast_buffers: bool = False,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        optimizer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTIMIZER_FIELDS}
        check_bool("QLoRADDPStrategy", "find_unused_parameters", find_unused_parameters)
        check_bool("QLoRADDPStrategy", "broadcast_buffers", broadcast_buffers)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            **_buffer_sync_kwargs(broadcast_buffers, kwargs),
        )
        self._init_qlora(
            optimizer, optimizer_kwargs, force_optimizer, max_grad_norm, activation_checkpointing
        )
        if start_method != "popen":
            rank_zero_warn(
                f"QLoRADDPStrategy(start_method={start_method!r}): the LightningModule in the launching "
                "process will not hold the trained adapters (they are injected in the worker processes, and "
                "Lightning copies rank 0's weights back non-strictly, so they are dropped). Use the "
                "checkpoints or LoRA(export_dir=...), or the default start_method='popen'."
            )

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Point at this strategy's names, not at plain "ddp" (which would drop the QLoRA recipe)."""
        super().on_exception(exception)
        _augment_message(
            exception,
            pattern=".*Expected to have finished reduction in the prior iteration.*",
            new_message=(
                "Some trainable parameters of the LightningModule took no part in the loss returned by "
                "training_step. If that is intended, let DDP look for unused parameters: "
                "`Trainer(strategy='qlora_ddp_find_unused_parameters_true')` or "
                "`QLoRADDPStrategy(find_unused_parameters=True)`. Otherwise check that every trainable "
                "module (adapters, modules_to_save) is used in the forward pass."
            ),
        )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        entries: list[tuple[str, dict[str, Any], str]] = [
            (cls.strategy_name, {}, "DDP, paged AdamW over the LoRA adapters (QLoRA)"),
            (
                f"{cls.strategy_name}_find_unused_parameters_true",
                {"find_unused_parameters": True},
                "qlora_ddp with DDP's find_unused_parameters=True",
            ),
        ]
        for name, init_params, description in entries:
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **init_params)


def _buffer_sync_kwargs(broadcast_buffers: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pass the per-forward buffer sync under the name this torch knows (2.13 renamed it and deprecated the
    old one); a `broadcast_buffers` or `forward_sync_buffers` given in `kwargs` is passed as it is."""
    if "broadcast_buffers" in kwargs or "forward_sync_buffers" in kwargs:
        return kwargs
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
    return {**kwargs, key: broadcast_buffers}
