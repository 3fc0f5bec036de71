"""A callback the CLI tests add with `+callbacks.x={_target_: cli_signals.SendSignal, ...}` (the test puts
this folder on the subprocess's PYTHONPATH): it sends the training process a real signal, or raises, at a
given step, so the interrupt handling is exercised at an exact, reproducible point."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class SendSignal(Callback):
    """After optimizer step `step`: send `times` SIGINTs to this process (or raise `RuntimeError`)."""

    def __init__(self, step: int, times: int = 1, raise_error: bool = False) -> None:
        self.step = step
        self.times = times
        self.raise_error = raise_error

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        if self.raise_error:
            raise RuntimeError(f"test failure at step {self.step}")
        for _ in range(self.times):
            os.kill(os.getpid(), signal.SIGINT)
