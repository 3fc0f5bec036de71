"""A callback the resume tests add with `+callbacks.probe={_target_: resume_probe.StepProbe, ...}` (the
test puts this folder on the subprocess's PYTHONPATH): it appends each step's loss and batch to a file,
flushed at once, and can kill its own process with SIGKILL (no cleanup, no handler) before a given step."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class StepProbe(Callback):
    """Write `{"step", "loss", "batch"}` per optimizer step to `path`; SIGKILL before step `kill_before`."""

    def __init__(self, path: str, kill_before: int | None = None) -> None:
        self.path = path
        self.kill_before = kill_before

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.kill_before is not None and trainer.global_step + 1 == self.kill_before:
            os.kill(os.getpid(), signal.SIGKILL)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ids = batch["input_ids"].cpu().numpy().tobytes()
        row = {
            "step": trainer.global_step,
            "loss": float(outputs["loss"]).hex(),  # exact
            "batch": hashlib.sha256(ids).hexdigest()[:16],
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
