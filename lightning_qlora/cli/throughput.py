"""`TokenThroughput`: training tokens per second on the progress bar, and over the whole run for a summary."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class TokenThroughput(Callback):
    """Time the training batches (forward, backward, optimizer step) and count tokens from the module.

    The module keeps a running count of real (non-padding) tokens in `attribute` (`tokens_seen` in the
    examples); without one only steps per second are measured. Validation time is not counted, and
    under DDP the numbers are per process (`global_tokens_per_sec` multiplies by the world size).

    Args:
        window: batches in the moving average shown on the progress bar.
        attribute: name of the module's token counter.
        prog_bar_name: key of the progress-bar value (not sent to the loggers).
    """

    def __init__(
        self, window: int = 20, attribute: str = "tokens_seen", prog_bar_name: str = "tok/s"
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be a positive number of batches, got {window}.")
        self.window = window
        self.attribute = attribute
        self.prog_bar_name = prog_bar_name
        self.train_time_s = 0.0
        self.steps = 0
        self.tokens: int | None = None
        self.world_size = 1
        self._recent: deque[tuple[float, int]] = deque(maxlen=window)
        self._batch_start: float | None = None
        self._last_count: int | None = None

    def _count(self, pl_module: pl.LightningModule) -> int | None:
        value = getattr(pl_module, self.attribute, None)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.world_size = trainer.world_size
        self._last_count = self._count(pl_module)
        self.tokens = 0 if self._last_count is not None else None
        self._recent.clear()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_start is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # time the work, not the kernel launches
        elapsed = time.perf_counter() - self._batch_start
        self._batch_start = None
        self.train_time_s += elapsed
        self.steps += 1
        count = self._count(pl_module)
        if count is None or self._last_count is None or self.tokens is None:
            return
        new_tokens = count - self._last_count
        self._last_count = count
        self.tokens += new_tokens
        self._recent.append((elapsed, new_tokens))
        window_time = sum(t for t, _ in self._recent)
        if window_time > 0:
            rate = sum(n for _, n in self._recent) / window_time
            pl_module.log(self.prog_bar_name, rate, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    @property
    def tokens_per_sec(self) -> float | None:
        """Tokens per second of training time in this process, over the whole run."""
        if self.tokens is None or self.train_time_s <= 0:
            return None
        return self.tokens / self.train_time_s

    @property
    def global_tokens_per_sec(self) -> float | None:
        """An estimate for all processes together (each rank sees its own share of the data)."""
        rate = self.tokens_per_sec
        return None if rate is None else rate * self.world_size

    @property
    def steps_per_sec(self) -> float | None:
        return self.steps / self.train_time_s if self.train_time_s > 0 else None
