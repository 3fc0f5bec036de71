"""2 CPU ranks (gloo), 2 micro-batches each, one optimizer step; each rank saves its gradients.

Lightning starts the second process by running this file again, so it is a script, not a test; see
test_sft_models.py, which compares the gradients with one process over all four micro-batches. The
strategy is DDP or the package's ``qlora_fsdp`` (FSDP2: each rank holds a shard of every gradient; the
whole gradients are gathered before they are saved).

    python token_loss_ddp_script.py OUT [ddp|qlora_fsdp|qlora_fsdp_tied]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from test_sft_models import LOSS_CHUNK, TINY, TrainableLM, micro_batches  # on sys.path
from torch.distributed.tensor import DTensor

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
        # a DTensor shard is gathered (a collective: every rank gathers the same names in the same order)
        grads = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in self.captured.items()}
        torch.save({"grads": grads, "loss": self.last_step_loss}, self.out / f"rank{self.global_rank}.pt")


def main(out: Path, strategy_name: str = "ddp") -> None:
    dm = InstructionDataModule(batch_size=8)
    dm.setup()
    torch.manual_seed(0)
    config = {**TINY, "tie_word_embeddings": strategy_name.endswith("_tied")}
    model = SavingLM(out, model_config=config, num_samples_to_generate=0, loss_chunk_tokens=LOSS_CHUNK)
    strategy: Any = DDPStrategy(process_group_backend="gloo")
    if strategy_name.startswith("qlora_fsdp"):
        from lightning_qlora import QLoRAFSDPStrategy

        strategy = QLoRAFSDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
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
    main(Path(sys.argv[1]), *sys.argv[2:3])
