"""The calibration loss `keep_sensitive` measures layers with: the LightningModule's own training loss on
one batch (the user's, or the first of the training data), computed without side effects on training.

Why the module's `training_step`: it is the one loss every LightningModule defines, so no model-specific
code is needed. It is called under `no_grad` with `self.log` silenced (Lightning's result collection does
not exist yet at setup) and the numbers it counts with put back afterwards (token counters, and a step's
loss accumulator, which would otherwise scale the first real step's gradients); the
first batch is drawn with the global RNG states saved and restored, so training sees the same data order
and dropout masks as it would without the measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_qlora._rng import capture_rng_state, restore_rng_state
from lightning_qlora.quantization.sensitivity import LossFunction


class CalibrationError(ValueError):
    """`keep_sensitive` has no batch to measure layers on, or the module's training step gives no loss."""


def first_training_batch(module: nn.Module) -> Any:
    """The first batch of the module's training data: its trainer's datamodule's, or its own hook's.

    Read through Lightning's public API only (`trainer.datamodule`, `train_dataloader()`). Loaders given
    to `fit(train_dataloaders=...)` are out of that API's reach until training starts, after quantization,
    so that case is refused with the fix (a calibration batch, or a datamodule).
    """
    trainer = _attached_trainer(module) if isinstance(module, pl.LightningModule) else None
    if trainer is None or not isinstance(module, pl.LightningModule):
        raise CalibrationError(
            "keep_sensitive measures layers on a calibration batch: set QLoRAPrecision.calibration_batch, "
            "or fit with a Trainer whose training data gives the first batch."
        )
    data = _training_data(trainer, module)
    state = capture_rng_state()
    try:
        return next(iter(data.train_dataloader()))
    except StopIteration:
        raise CalibrationError("keep_sensitive: the training data is empty, so there is no batch.") from None
    finally:
        restore_rng_state(state)


def _attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def _training_data(trainer: pl.Trainer, module: pl.LightningModule) -> Any:
    """What defines the training data: the trainer's datamodule (from `fit`/`validate(datamodule=...)`),
    else the module's own `train_dataloader` hook."""
    datamodule = getattr(trainer, "datamodule", None)  # documented, but set outside Trainer.__init__
    if datamodule is not None and is_overridden("train_dataloader", datamodule, pl.LightningDataModule):
        return datamodule
    if is_overridden("train_dataloader", module, pl.LightningModule):
        return module
    raise CalibrationError(
        "keep_sensitive measures layers on the first training batch, read from the Trainer's datamodule or "
        f"{type(module).__name__}.train_dataloader(); neither defines training data here. Loaders given to "
        "fit(train_dataloaders=...) cannot be read before quantization (Lightning builds them later): set "
        "QLoRAPrecision.calibration_batch (e.g. next(iter(loader))) or fit with a datamodule."
    )


def training_step_loss(module: nn.Module, batch: Any, device: torch.device) -> LossFunction:
    """A function giving `module.training_step(batch, 0)`'s loss on `device`, without logging or counting."""
    if not isinstance(module, pl.LightningModule):
        raise CalibrationError(
            "keep_sensitive measures layers with a LightningModule's training_step; got "
            f"{type(module).__name__}."
        )
    lightning_module = module
    batch = move_data_to_device(batch, device)

    def loss() -> torch.Tensor:
        with _quiet(module):
            out = lightning_module.training_step(batch, 0)
        value = out.get("loss") if isinstance(out, dict) else out
        if not isinstance(value, torch.Tensor):
            raise CalibrationError(
                f"keep_sensitive needs {type(module).__name__}.training_step to return a loss tensor "
                f"(or a dict with 'loss'), got {type(out).__name__}."
            )
        return value.detach().float()

    return loss


@contextlib.contextmanager
def _quiet(module: nn.Module) -> Iterator[None]:
    """Silence `log`/`log_dict` and put back the numbers `training_step` may change: the module's plain
    number attributes (token counters) and those of small holder objects (a step's loss accumulator)."""
    numbers = {k: v for k, v in vars(module).items() if _is_number(v)}
    holders = {
        id(v): (v, dict(vars(v)))
        for v in vars(module).values()
        if not isinstance(v, (nn.Module, torch.Tensor, type)) and _holds_only_numbers(v)
    }
    vars(module).update(log=_ignore, log_dict=_ignore)  # shadow the methods on this instance only
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            vars(module).pop(name, None)
        vars(module).update(numbers)
        for holder, state in holders.values():
            vars(holder).clear()
            vars(holder).update(state)


def _is_number(value: object) -> bool:
    return type(value) in (int, float, bool)


def _holds_only_numbers(value: object) -> bool:
    state = getattr(value, "__dict__", None)
    return isinstance(state, dict) and bool(state) and all(_is_number(v) for v in state.values())


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
