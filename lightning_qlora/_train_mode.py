"""Train the modules the package adapts or checkpoints in training mode, whatever mode the model came in.

`from_pretrained` returns a model in eval mode, and Lightning 2.6 keeps each submodule's mode through
`fit`. A user's LightningModule that does not call `.train()` would then train with adapter dropout off and
activation checkpointing skipped (it only recomputes in training mode), without a word.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from torch import nn

from lightning_qlora._logging import rank_zero_info
from lightning_qlora._names import describe_names


def ensure_training(pl_module: pl.LightningModule, modules: Iterable[nn.Module], who: str, why: str) -> bool:
    """Switch `pl_module` to training mode if one of `modules` is in eval mode, saying so; True if it did."""
    names = {id(m): n for n, m in pl_module.named_modules()}
    in_eval = [names.get(id(m), type(m).__name__) or "(the module)" for m in modules if not m.training]
    if not in_eval:
        return False
    pl_module.train()
    rank_zero_info(
        f"{who}: {len(in_eval)} module(s) it {why} were in eval mode (as `from_pretrained` leaves a model), "
        f"e.g. {describe_names(in_eval, 3)}; switched {type(pl_module).__name__} to training mode for fit. "
        "Call `.eval()` on a submodule in `on_train_start` to keep it in eval mode on purpose."
    )
    return True
