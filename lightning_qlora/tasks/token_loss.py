"""Token-correct loss: an optimizer step's loss is the mean over all its target tokens.

Averaging each micro-batch's loss over its own tokens, then over micro-batches (Lightning divides by
``accumulate_grad_batches``) and ranks (DDP averages gradients) weights a token of a short micro-batch
more than one of a long micro-batch: the gradient-accumulation bug that TRL, Unsloth and torchtune fixed
in 2024. The number of tokens of a whole step is only known after its last micro-batch, so each
micro-batch's backward runs on its *summed* token loss, and just before the optimizer step (after every
backward, before clipping) the gradients are multiplied by ``accumulate * world_size / tokens_of_step``,
with the token count summed over the ranks: the gradients then equal those of the token mean over the
whole step, exactly (up to float rounding), with one scalar all-reduce per step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor


class StepTokenMean:
    """Collects the summed losses and token counts of a step's micro-batches and rescales the gradients."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0

    def add(self, loss_sum: Tensor, tokens: int) -> None:
        """Record one micro-batch (its summed loss is only read, never backpropagated from here)."""
        self.loss_sum += float(loss_sum.detach())
        self.tokens += int(tokens)

    def finish_step(self, module: pl.LightningModule) -> tuple[float, int]:
        """Rescale the gradients of ``module`` to the token mean of the step; return (mean loss, tokens).

        Every rank must call it at each optimizer step (it all-reduces the counts).
        """
        trainer = module.trainer
        stats = torch.tensor([self.loss_sum, float(self.tokens)], dtype=torch.float64, device=module.device)
        if trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
        loss_sum, tokens = float(stats[0]), int(stats[1])
        self.loss_sum, self.tokens = 0.0, 0
        scale = trainer.accumulate_grad_batches * trainer.world_size / max(tokens, 1)
        for parameter in module.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)
        return (loss_sum / tokens if tokens else 0.0), tokens
