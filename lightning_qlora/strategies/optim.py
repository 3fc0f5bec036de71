"""The optimizer the QLoRA strategies install: paged AdamW over the trainable parameters, and its schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_qlora.optimizer_config import (  # noqa: F401 (the strategies' names for them)
    OPTIMIZER_FIELDS,
    OPTIMIZERS,
    SCHEDULERS,
    OptimizerConfig,
    StrategySettings,
)


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], config: OptimizerConfig
) -> Optimizer:
    """The configured optimizer over `params` (the trainable parameters, or param groups)."""
    cls: Callable[..., Optimizer] = config.optimizer_class
    return cls(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        **config.kwargs,
    )


class WarmupSchedule:
    """Learning-rate factor for `LambdaLR`: linear warmup from 0, then constant, linear or cosine decay to 0.

    A small callable object rather than a closure so that `LambdaLR.state_dict` saves its few numbers (and
    a checkpoint loads without pickled code).
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int | None) -> None:
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        assert self.total_steps is not None
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (
            f"WarmupSchedule({self.kind!r}, warmup_steps={self.warmup_steps}, total_steps={self.total_steps})"
        )


def build_scheduler(
    optimizer: Optimizer, config: OptimizerConfig, total_steps: float | int | None = None
) -> LambdaLR | None:
    """A per-step `LambdaLR`, or None for a constant rate without warmup (nothing to schedule).

    `total_steps` is the run's number of optimizer steps (`trainer.estimated_stepping_batches`); only
    decaying schedules and `warmup_ratio` need it.
    """
    needs_total = config.scheduler != "constant" or config.warmup_ratio is not None
    steps: int | None = None
    if needs_total:
        if total_steps is None or not math.isfinite(float(total_steps)) or total_steps <= 0:
            raise ValueError(
                f"The {config.scheduler!r} schedule"
                f"{' with warmup_ratio' if config.warmup_ratio is not None else ''} needs a finite number of "
                f"training steps, got {total_steps!r}: set the Trainer's max_steps or max_epochs."
            )
        steps = int(total_steps)
    if config.warmup_ratio is not None:
        assert steps is not None
        warmup = math.ceil(config.warmup_ratio * steps)
    else:
        warmup = config.warmup_steps or 0
    if config.scheduler == "constant" and warmup == 0:
        return None
    return LambdaLR(optimizer, WarmupSchedule(config.scheduler, warmup, steps))
