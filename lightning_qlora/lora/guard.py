"""Stop a diverged run before it can overwrite good adapters: non-finite loss, gradients or weights.

A loss of NaN or inf (bad inputs, an lr of 1e12, an infinite alpha) would otherwise train on for the rest
of the run, exit 0 and export NaN adapters over the last good ones. `NonFiniteGuard` checks the loss
before backward, the gradients before each optimizer step and the trained weights after it; a bad step is
either skipped (its update dropped, up to `max_skipped_steps` of them) or ends `fit` with a
`DivergenceError` naming the step. Checkpoints and exports of non-finite weights are refused outright, so
whatever was written before stays as it was.

The `LoRA` callback runs one of these itself; add it to the Trainer on its own for training without LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_qlora._logging import rank_zero_warn
from lightning_qlora._names import describe_names


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; nothing non-finite was saved."""


def check_max_skipped_steps(value: object) -> int:
    """`max_skipped_steps` must be a non-negative int (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"max_skipped_steps must be a non-negative integer (0: stop at the first non-finite step), "
            f"got {value!r}."
        )
    return value


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor | None]]) -> list[str]:
    """Names of the floating tensors that hold a NaN or an inf (one device sync for all of them)."""
    names: list[str] = []
    flags: list[torch.Tensor] = []
    for name, tensor in named:
        if tensor is None or not torch.is_floating_point(tensor) or tensor.device.type == "meta":
            continue
        if _is_dtensor(tensor):  # a shard (qlora_fsdp): each process checks its own rows
            tensor = tensor.to_local()  # type: ignore[attr-defined]
        names.append(name)
        flags.append(torch.isfinite(tensor).all())
    if not flags:
        return []
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # the one device sync
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def check_finite_state(state: Mapping[str, Any], what: str) -> None:
    """Raise `DivergenceError` if a tensor of `state` is not finite: `what` is about to be written."""
    bad = nonfinite_names((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    if bad:
        raise DivergenceError(
            f"Refusing to write {what}: {len(bad)} tensor(s) hold NaN or inf, e.g. "
            f"{describe_names(bad, 4)}. Training diverged; whatever was written before is left unchanged."
        )


class NonFiniteGuard(Callback):
    """End `fit` with a `DivergenceError` naming the step at the first non-finite loss or gradient.

    Args:
        max_skipped_steps: optimizer steps with a non-finite loss or gradient that may be skipped (their
            gradients dropped, so the weights do not move) before training stops; 0 stops at the first.
            Non-finite weights after a step always stop training: nothing can be skipped then.
    """

    def __init__(self, max_skipped_steps: int = 0) -> None:
        self.max_skipped_steps = check_max_skipped_steps(max_skipped_steps)
        self.skipped_steps = 0
        self._bad_loss: float | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bad_loss = None

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # Decided before the optimizer step, together with the gradients (and across processes).
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().flatten()[0])

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params = _optimizer_params(optimizer)
        names = _param_names(pl_module)
        bad_grads: list[str] = []
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            # With fp16 loss scaling, inf gradients are expected now and then: the GradScaler skips
            # those steps and lowers the scale itself. A non-finite loss still stops training.
            bad_grads = nonfinite_names((names.get(id(p), "?"), p.grad) for p in params)
        bad_loss, self._bad_loss = self._bad_loss, None
        local = bad_loss is not None or bool(bad_grads)
        # Gradients are all-reduced, the loss is not: every process must take the same decision.
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        what = _describe(bad_loss, bad_grads)
        where = _where(trainer)
        if self.skipped_steps < self.max_skipped_steps:
            self.skipped_steps += 1
            for p in params:
                p.grad = None  # optimizers skip parameters without a gradient: the weights stay as they were
            rank_zero_warn(
                f"Skipped {where}: {what}. Skipped {self.skipped_steps} of at most "
                f"{self.max_skipped_steps} step(s) (max_skipped_steps)."
            )
            return
        allowance = (
            f"after skipping {self.skipped_steps} step(s), the most max_skipped_steps allows"
            if self.max_skipped_steps
            else "max_skipped_steps=0"
        )
        raise DivergenceError(
            f"Training diverged at {where}: {what} ({allowance}). Nothing non-finite was saved or "
            "exported. Lower the learning rate or alpha, check the inputs for NaN/inf, or allow a few bad "
            "steps with max_skipped_steps."
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bad = nonfinite_names((n, p) for n, p in pl_module.named_parameters() if p.requires_grad)
        if bad:
            raise DivergenceError(
                f"Training diverged: after {_where(trainer, done=True)} {len(bad)} trained weight(s) hold "
                f"NaN or inf, e.g. {describe_names(bad, 4)} (the update overflowed: lower the learning rate "
                "or alpha). Nothing non-finite was saved or exported."
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_finite_state(checkpoint.get("state_dict", {}), "a checkpoint")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


def _optimizer_params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _param_names(module: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def _where(trainer: pl.Trainer, done: bool = False) -> str:
    # global_step counts finished optimizer steps: the step being taken is number global_step + 1.
    step = trainer.global_step if done else trainer.global_step + 1
    return f"optimizer step {step} (epoch {trainer.current_epoch})"


def _describe(bad_loss: float | None, bad_grads: list[str]) -> str:
    parts = []
    if bad_loss is not None:
        parts.append(f"the loss is {bad_loss}")
    if bad_grads:
        parts.append(f"{len(bad_grads)} gradient(s) hold NaN or inf, e.g. {describe_names(bad_grads, 4)}")
    return "; ".join(parts) if parts else "another process saw a non-finite loss or gradient"
