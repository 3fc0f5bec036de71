"""The calibration loss `keep_sensitive` measures layers with: the LightningModule's own training loss on
one batch (the user's, or the first of the training data), computed without side effects on training.

Why the module's `training_step`: it is the one loss every LightningModule defines, so no model-specific
code is needed. It is called under `no_grad` with `self.log` silenced (Lightning's result collection does
not exist yet at setup) and the module's plain-number attributes (token counters) put back afterwards; the
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
from torch import nn

from lightning_qlora._rng import capture_rng_state, restore_rng_state
from lightning_qlora.quantization.sensitivity import LossFunction


class CalibrationError(ValueError):
    """`keep_sensitive` has no batch to measure layers on, or the module's training step gives no loss."""


def first_training_batch(module: nn.Module) -> Any:
    """The first batch of the training data the module's trainer will fit on (datamodule or module)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        raise CalibrationError(
            "keep_sensitive measures layers on a calibration batch: set QLoRAPrecision.calibration_batch, "
            "or fit with a Trainer whose training data gives the first batch."
        )
    state = capture_rng_state()
    try:
        return next(iter(_training_data(trainer, module)))
    except StopIteration:
        raise CalibrationError("keep_sensitive: the training data is empty, so there is no batch.") from None
    finally:
        restore_rng_state(state)


def _training_data(trainer: Any, module: nn.Module) -> Any:
    """What `fit` was given (loaders, a datamodule, or the module's own hook), as Lightning will read it."""
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is not None and source.instance is not None and source.is_defined():
        return source.dataloader()
    datamodule = getattr(trainer, "datamodule", None)  # e.g. `validate(datamodule=...)` before `fit`
    source_of_data: Any = datamodule if datamodule is not None else module
    return source_of_data.train_dataloader()


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
    """Silence `log`/`log_dict` and put back the plain numbers (counters) `training_step` may change."""
    numbers = {k: v for k, v in vars(module).items() if type(v) in (int, float, bool)}
    vars(module).update(log=_ignore, log_dict=_ignore)  # shadow the methods on this instance only
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            vars(module).pop(name, None)
        vars(module).update(numbers)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
