"""Keep the work of a run that is stopped: Ctrl-C or an exception during training.

First Ctrl-C during training: the current step finishes, a resumable checkpoint is written, fit ends
without another validation and the LoRA callback exports the adapters as usual (the summary marks the run
interrupted and prints the command that resumes it). A second Ctrl-C exits at once (status 130). An
exception in training writes the adapters and a checkpoint as they are (unless they hold NaN or inf, which
would only replace good work with garbage), then the error goes on.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_qlora.lora.callback import LoRA, export_root
from lightning_qlora.lora.guard import DivergenceError

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
SECOND_INTERRUPT_EXIT_CODE = 130  # the shell's code for a SIGINT death


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class InterruptHandler(Callback):
    """Turns Ctrl-C during training into a clean stop with a checkpoint; saves what it can on an error.

    Args:
        checkpoint_path: where the resumable checkpoint goes.
        lora: the job's LoRA callback (its `export_dir` and config are used to export after an error).
    """

    def __init__(self, checkpoint_path: str | Path, lora: LoRA) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.lora = lora
        self.requested = False
        self.checkpoint: Path | None = None
        self.adapter_dir: Path | None = None  # where adapters were written after an error, if they were
        self.error: BaseException | None = None
        self._training = False

    @property
    def interrupted(self) -> bool:
        return self.requested or self.error is not None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """SIGINT goes to this handler while the block runs (main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            _say("\nSecond Ctrl-C: exiting now, without saving.")
            os._exit(SECOND_INTERRUPT_EXIT_CODE)
        if not self._training:  # loading, validating: nothing trained yet, stop the usual way
            raise KeyboardInterrupt
        self.requested = True
        _say(
            "\nCtrl-C: stopping after this step and saving the adapters and a resumable checkpoint "
            "(Ctrl-C again to exit at once, without saving)."
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.requested
        if trainer.world_size > 1:  # every rank stops at the same step (one Ctrl-C may reach only one)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or self.checkpoint is not None:
            return
        self.requested = True
        trainer.save_checkpoint(self.checkpoint_path)  # collective: every rank calls it, rank 0 writes
        self.checkpoint = self.checkpoint_path
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # no validation on the way out; the LoRA callback exports at fit end
        for callback in trainer.checkpoint_callbacks:  # nor a best-metric save at epoch end (no metric)
            if hasattr(callback, "_save_on_train_epoch_end"):
                callback._save_on_train_epoch_end = False

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._training = False
        self.error = exception
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return  # nothing trained yet
        if isinstance(exception, DivergenceError):
            return  # the weights that led to a NaN are not worth keeping: the last good export stays
        if not trainable_weights_finite(pl_module):
            rank_zero_warn("The trainable weights hold NaN or inf: no adapters or checkpoint written.")
            return
        if trainer.world_size == 1:  # other ranks may not reach a collective save: skip it under DDP
            try:
                trainer.save_checkpoint(self.checkpoint_path)
                self.checkpoint = self.checkpoint_path
            except Exception as err:  # keep the original error the one reported
                rank_zero_warn(f"Could not write a checkpoint after the error: {type(err).__name__}: {err}")
        if self.lora.export_dir is not None and trainer.is_global_zero:
            try:
                from lightning_qlora.lora.peft_format import save_peft_adapter

                root = export_root(pl_module, self.lora.export_module)
                self.adapter_dir = save_peft_adapter(root, self.lora.export_dir, self.lora.config)
                rank_zero_info(f"LoRA: adapters trained so far written in PEFT format to {self.adapter_dir}")
            except Exception as err:
                rank_zero_warn(f"Could not export the adapters after the error: {type(err).__name__}: {err}")


def trainable_weights_finite(module: torch.nn.Module) -> bool:
    """No NaN or inf in any trainable parameter (adapters, modules_to_save)."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.requires_grad)


def hydra_quote(value: str) -> str:
    """A value Hydra's override parser reads back verbatim: quoted when it holds `=`, `,`, spaces, ...
    (a sweep's job folder such as `0_lora.r=4,optimizer.lr=0.001` would otherwise read as a sweep)."""
    if re.fullmatch(r"[A-Za-z0-9_./:-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_command(overrides: Sequence[str], checkpoint: Path, run_dir: Path) -> str:
    """The command that resumes this job, ready to paste in a shell.

    The interpreter that ran (so the command works where the console script is not on PATH, or a
    virtual environment is not active), the job's overrides, `ckpt_path` pointing at the checkpoint and
    `hydra.run.dir` at the run folder, so the resumed run goes on writing where this one did.
    """
    replaced = ("ckpt_path", "hydra.run.dir")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in replaced]
    return shlex.join(
        [
            sys.executable,
            "-m",
            "lightning_qlora.cli",
            *kept,
            f"ckpt_path={hydra_quote(str(checkpoint))}",
            f"hydra.run.dir={hydra_quote(str(run_dir))}",
        ]
    )
