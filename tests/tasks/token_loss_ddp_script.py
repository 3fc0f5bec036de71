"""2 CPU ranks (gloo), 2 micro-batches each, one optimizer step; each rank saves its gradients.

Lightning starts the second process by running this file again, so it is a script, not a test; see
test_sft_models.py, which compares the gradients with one process over all four micro-batches.

    python token_loss_ddp_script.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from test_sft_models import TINY, TrainableLM, micro_batches  # this script's folder is on sys.path

from lightning_qlora.tasks import InstructionDataModule


class RankShard(torch.utils.data.Dataset):
    """Rank r trains on micro-batches 2r and 2r + 1 (the rank is read once the process group exists)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return self.batches[2 * rank + index]


class SavingLM(TrainableLM):
    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        torch.save(
            {"grads": self.captured, "loss": self.last_step_loss}, self.out / f"rank{self.global_rank}.pt"
        )


def main(out: Path) -> None:
    dm = InstructionDataModule(batch_size=8)
    dm.setup()
    torch.manual_seed(0)
    model = SavingLM(out, model_config=TINY, num_samples_to_generate=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=1,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(RankShard(micro_batches(dm)), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
