"""`curves.png`: the picture of a run (losses, the task metric, memory) drawn from what a callback recorded.

Recorded in the process rather than read back from a logger, so every run gets its curves whatever
logger it uses (or none). Validation before training is drawn at step 0: the untuned starting point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

CURVES_NAME = "curves.png"


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class Curves:
    """Per-step series: (step, value) pairs."""

    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    metric: list[tuple[int, float]] = field(default_factory=list)
    rss_mib: list[tuple[int, float]] = field(default_factory=list)
    cuda_mib: list[tuple[int, float]] = field(default_factory=list)


class CurveRecorder(Callback):
    """Record the training loss and memory after each step and the validation loss and metric.

    Args:
        metric: the task metric to draw (the job's `metric.name`, e.g. `val/acc`).
        loss: the validation loss key.
    """

    def __init__(self, metric: str, loss: str = "val/loss") -> None:
        self.metric_name = metric
        self.loss_name = loss
        self.curves = Curves()
        self._process = psutil.Process()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        # a module whose backward runs on a summed loss states each optimizer step's mean loss itself
        if hasattr(pl_module, "last_step_loss"):
            step_loss = _number(pl_module.last_step_loss)  # None before the first step
            recorded = self.curves.train_loss[-1][0] if self.curves.train_loss else None
            if step_loss is not None and recorded != step:
                self.curves.train_loss.append((step, step_loss))
        else:
            loss = _number(outputs.get("loss") if isinstance(outputs, dict) else outputs)
            if loss is not None:
                self.curves.train_loss.append((step, loss))
        self.curves.rss_mib.append((step, self._process.memory_info().rss / 2**20))
        if pl_module.device.type == "cuda":
            self.curves.cuda_mib.append((step, torch.cuda.memory_allocated(pl_module.device) / 2**20))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = trainer.global_step
        for name, series in ((self.loss_name, self.curves.val_loss), (self.metric_name, self.curves.metric)):
            value = _number(trainer.callback_metrics.get(name))
            if value is not None:
                series.append((step, value))


def plot_curves(curves: Curves, path: str | Path, title: str, metric: str) -> Path | None:
    """Draw the three panels into `path` (PNG); None when nothing was recorded."""
    if not (curves.train_loss or curves.val_loss or curves.metric):
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric, ax_mem) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, series, label, style in (
        (ax_loss, curves.train_loss, "train loss", "-"),
        (ax_loss, curves.val_loss, "validation loss", "o-"),
        (ax_metric, curves.metric, metric, "o-"),
        (ax_mem, curves.rss_mib, "resident memory (RSS)", "-"),
        (ax_mem, curves.cuda_mib, "CUDA allocated", "-"),
    ):
        if series:
            steps, values = zip(*series, strict=True)
            ax.plot(steps, values, style, label=label, markersize=4)
    ax_loss.set_title("loss")
    ax_metric.set_title(metric)
    ax_mem.set_title("memory (MiB)")
    for ax in (ax_loss, ax_metric, ax_mem):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
