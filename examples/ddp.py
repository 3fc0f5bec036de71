"""DDP: the QLoRA recipe over two processes, on CPU (gloo), the same code as on several GPUs.

`strategy="qlora_ddp"` (or `QLoRADDPStrategy()`) is Lightning's DDP plus the QLoRA optimizer, clipping and
activation checkpointing. Each process quantizes its own copy of the base; only the adapters train, so
only their gradients are all-reduced. Lightning starts the second process by running this script again,
so everything runs under `if __name__ == "__main__"`. At the end every rank checks that its adapters are
identical to rank 0's.

Run: python examples/ddp.py [--steps 10] [--devices 2]   (--smoke: 2 steps)
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="2 steps: check that it runs")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the imports below: --help answers without loading torch (seconds)

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lightning_qlora import LoRA, QLoRADDPStrategy, QLoRAPrecision


class CausalLM(pl.LightningModule):
    """A small random Llama built in `configure_model`, trained on a repeating token pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.model: LlamaForCausalLM | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(0)  # every rank builds the same base
        config = LlamaConfig(
            hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False,
        )  # fmt: skip
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train/loss", loss, sync_dist=True)
        return loss


def main(args: argparse.Namespace) -> None:
    pl.seed_everything(0)
    module = CausalLM()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=QLoRADDPStrategy(activation_checkpointing=LlamaDecoderLayer),
        plugins=[QLoRAPrecision(compute_dtype=torch.float32)],
        callbacks=[LoRA(r=8, alpha=16, dropout=0.1)],
        max_steps=2 if args.smoke else args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    data = torch.arange(32).repeat(32, 2)  # 32 rows; the DistributedSampler gives each rank half
    trainer.fit(module, DataLoader(data, batch_size=2))

    trained = torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad])
    rank0 = trainer.strategy.broadcast(trained, src=0)
    same = torch.equal(trained, rank0)
    print(f"rank {trainer.global_rank}: {trainer.global_step} steps, adapters identical to rank 0's: {same}")
    assert same, "DDP should keep every rank's adapters in sync"


if __name__ == "__main__":
    main(ARGS)
