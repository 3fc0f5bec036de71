"""`QLoRAStrategy`: one device, paged AdamW over the adapters, grad-norm clip 0.3, no configure_optimizers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_qlora.strategies.hook import ActivationCheckpointing, _PagedOptimizerMixin
from lightning_qlora.strategies.optim import OptimizerConfig, StrategySettings

_DEFAULTS = StrategySettings()


class QLoRAStrategy(_PagedOptimizerMixin, SingleDeviceStrategy):
    """Lightning's single-device strategy plus the QLoRA training recipe.

    `Trainer(plugins=[QLoRAPrecision()], callbacks=[LoRA()], strategy=QLoRAStrategy())`, or
    `strategy="qlora"`. Unless the LightningModule defines `configure_optimizers`, the strategy installs
    bitsandbytes' paged AdamW over exactly the parameters that require grad (the adapters, after the LoRA
    callback froze the base).

    Args:
        optimizer: an `OptimizerConfig` (or a mapping of its fields); None for the paper's defaults.
        force_optimizer: install the strategy's optimizer even if the module defines configure_optimizers.
        max_grad_norm: gradient-norm clip set on the Trainer when it has none (`gradient_clip_val`); None
            leaves clipping alone.
        activation_checkpointing: module classes (or class names) whose activations are recomputed in
            backward, e.g. the transformer block class.
        device: the device to train on; None means the Trainer's (its accelerator and `devices`).
        accelerator, checkpoint_io, precision_plugin: as for Lightning's `SingleDeviceStrategy`.
        **optimizer_kwargs: fields of `OptimizerConfig` (`lr`, `name`, `betas`, `eps`, `weight_decay`,
            `scheduler`, `warmup_steps`, `warmup_ratio`, `kwargs`), a shorthand: `QLoRAStrategy(lr=1e-3)` is
            `QLoRAStrategy(optimizer=OptimizerConfig(lr=1e-3))`; given with `optimizer`, they replace its
            fields.
    """

    strategy_name = "qlora"

    def __init__(
        self,
        optimizer: OptimizerConfig | dict[str, Any] | None = None,
        force_optimizer: bool = _DEFAULTS.force_optimizer,
        max_grad_norm: float | None = _DEFAULTS.max_grad_norm,
        activation_checkpointing: ActivationCheckpointing = None,
        device: _DEVICE | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None
        self._auto_device: tuple[pl.accelerators.Accelerator, torch.device] | None = None
        self._trainer_device: torch.device | None = None  # device=None: the one the Trainer was given
        self._init_qlora(
            optimizer, optimizer_kwargs, force_optimizer, max_grad_norm, activation_checkpointing
        )

    @property
    @override
    def root_device(self) -> torch.device:
        if self._device_given:
            return self._root_device
        if self._trainer_device is not None:
            return self._trainer_device
        if self.accelerator is not None:
            if self._auto_device is None or self._auto_device[0] is not self.accelerator:
                self._auto_device = (self.accelerator, _first_device(self.accelerator))
            return self._auto_device[1]
        return self._root_device

    @override
    def setup_environment(self) -> None:
        if not self._device_given:
            self._resolve_device_from_trainer()
        super().setup_environment()

    def _resolve_device_from_trainer(self) -> None:
        """Take the device the Trainer was asked for (`devices=[1]` means cuda:1), as Lightning does for its
        own single-device strategy. Lightning hands parsed devices only to parallel strategies, so they are
        read from the Trainer's connector."""
        self._trainer_device = None
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        devices = getattr(getattr(trainer, "_accelerator_connector", None), "_parallel_devices", None)
        if not devices:
            return
        if len(devices) > 1:
            raise ValueError(
                f"QLoRAStrategy trains on one device, but the Trainer was given {len(devices)} devices. Use "
                "strategy='qlora_ddp' (or QLoRADDPStrategy()) to train on several."
            )
        device = devices[0]
        self._trainer_device = device if isinstance(device, torch.device) else torch.device(device)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="Single device, paged AdamW over the LoRA adapters (QLoRA)",
            )


def _first_device(accelerator: pl.accelerators.Accelerator) -> torch.device:
    """The accelerator's first device: cpu, cuda:0, mps:0."""
    cls = type(accelerator)
    device = cls.get_parallel_devices(cls.parse_devices(1))[0]
    return device if isinstance(device, torch.device) else torch.device(device)
