"""Trainer values Lightning accepts but a QLoRA run cannot use, refused before the model loads.

Lightning takes `accumulate_grad_batches=0` (no optimizer step ever happens: the run "trains" for hours
and the adapters stay at their initial values) and a negative `gradient_clip_val` (clipping to a negative
norm flips every gradient's sign) without a word.
"""

from __future__ import annotations

import math

from lightning_qlora._settings import SettingTypeError


def check_trainer_settings(accumulate_grad_batches: object, gradient_clip_val: object, prefix: str) -> None:
    """`prefix` names where the values came from: `trainer.` (the command) or `Trainer(...)` arguments."""
    if (
        isinstance(accumulate_grad_batches, bool)
        or not isinstance(accumulate_grad_batches, int)
        or accumulate_grad_batches < 1
    ):
        raise SettingTypeError(
            f"{prefix}accumulate_grad_batches must be a positive integer (1: an optimizer step after every "
            f"batch), got {accumulate_grad_batches!r}."
        )
    if gradient_clip_val is None:
        return
    ok = isinstance(gradient_clip_val, (int, float)) and not isinstance(gradient_clip_val, bool)
    if not ok or not math.isfinite(float(gradient_clip_val)) or float(gradient_clip_val) < 0:  # type: ignore[arg-type]
        raise SettingTypeError(
            f"{prefix}gradient_clip_val must be a finite number >= 0 or null (no clipping of your own: the "
            f"QLoRA strategies then clip at max_grad_norm), got {gradient_clip_val!r}."
        )
