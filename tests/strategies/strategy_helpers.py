"""A tiny LightningModule and Trainer factory shared by the strategy tests (and by ddp_script.py)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRA, QLoRAPrecision

IN, HIDDEN, OUT = 16, 64, 4


class Block(nn.Module):
    """A residual MLP block: the unit activation checkpointing is applied to."""

    forward_calls = 0  # counts real forward computations (recomputation in backward included)

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, width)
        self.act = nn.GELU()
        self.down = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Block.forward_calls += 1
        return x + self.down(self.act(self.up(x)))


class TinyModule(pl.LightningModule):
    """Records the loss of every step by global step, so runs can be compared step for step."""

    def __init__(self, blocks: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(IN, HIDDEN), nn.GELU()]
        layers += [Block(HIDDEN) for _ in range(blocks)]
        layers += [nn.Linear(HIDDEN, OUT)]
        self.model = nn.Sequential(*layers)
        self.losses: dict[int, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses[self.global_step] = loss.item()
        return loss


class WithOwnOptimizer(TinyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def dataloader(samples: int = 48, batch_size: int = 8) -> DataLoader:
    """Fixed data, no shuffling: a resumed run sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(1234)
    data = TensorDataset(
        torch.randn(samples, IN, generator=generator), torch.randint(0, OUT, (samples,), generator=generator)
    )
    return DataLoader(data, batch_size=batch_size)


def trainer(
    strategy: Any,
    max_steps: int = 3,
    quantize: bool = True,
    callbacks: list[Callback] | None = None,
    lora: bool = True,
    **kwargs: Any,
) -> Trainer:
    plugins = [QLoRAPrecision(compute_dtype="float32", log_report=False)] if quantize else []
    all_callbacks: list[Callback] = [LoRA(r=4, alpha=8, dropout=0.0)] if lora else []
    all_callbacks += callbacks or []
    options: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=max_steps,
        plugins=plugins,
        callbacks=all_callbacks,
        **options,
    )


def trainable_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def optimized_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}
