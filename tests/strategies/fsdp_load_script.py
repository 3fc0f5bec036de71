"""Rank-aware loading under "qlora_fsdp": a tiny Llama loaded with `load_quantized(shard=self.device_mesh)`
in `configure_model`, then trained (test_fsdp_load.py), or the single-process reference ("qlora", the
whole model loaded, the same global batches) run in the test's own process.

Each rank writes OUT/rank<r>.pt: the 4-bit bytes its model held at every tensor the loader read (counted
through `load_quantized`'s `key_map` hook, called before each read), the gathered state at the end, the
adapters and the losses. The run also writes a full-state checkpoint (`adapter_only_checkpoints=False`)
and a PEFT export.

    python fsdp_load_script.py OUT MODEL_DIR [--strategy qlora_fsdp|qlora] [--devices N] [--num-nodes M]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.tensor import DTensor

from lightning_qlora import LoRA, OptimizerConfig, QLoRAPrecision, load_quantized
from lightning_qlora.quantization import QuantizationConfig
from lightning_qlora.quantization.layers import is_linear4bit
from lightning_qlora.strategies.fsdp_state import full_state_dict

STEPS, ROWS, TOKENS = 3, 4, 16  # global batch: ROWS sequences of TOKENS tokens


def held_4bit_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(packed 4-bit bytes this process holds, quant-state statistics bytes) of the loaded layers."""
    packed = stats = 0
    for sub in model.modules():
        if not is_linear4bit(sub) or sub.weight.device.type == "meta":
            continue
        weight = sub.weight
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        packed += local.numel() * local.element_size()
        state = getattr(sub, "quant_state", None)
        if state is not None:
            stats += sum(
                t.numel() * t.element_size()
                for t in state.as_dict(packed=True).values()
                if isinstance(t, torch.Tensor)
            )
    return packed, stats


class CausalLM(pl.LightningModule):
    """Builds its Llama on the meta device and loads it in `configure_model` (where the mesh is known)."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__()
        self.model_dir = model_dir
        self.model: torch.nn.Module | None = None
        self.losses: dict[int, float] = {}
        self.load_peak_4bit = 0
        self.load_stats = 0
        self.refusal = ""

    def configure_model(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        if self.model is not None:
            return
        with torch.device("meta"):
            self.model = LlamaForCausalLM(LlamaConfig.from_pretrained(self.model_dir))
        model = self.model
        if self.device_mesh is not None:  # refused before any tensor is read: the mesh is on the CPU
            try:
                load_quantized(model, self.model_dir, device="meta", shard=self.device_mesh)
            except ValueError as error:
                self.refusal = str(error)

        def count(key: str) -> str:  # called before each tensor is read
            self.load_peak_4bit = max(self.load_peak_4bit, held_4bit_bytes(model)[0])
            return key

        load_quantized(
            model,
            self.model_dir,
            QuantizationConfig(compute_dtype="float32"),
            compute_dtype=torch.float32,
            key_map=count,
            shard=self.device_mesh,  # None with one process ("qlora"): the whole model
        )
        packed, self.load_stats = held_4bit_bytes(model)
        self.load_peak_4bit = max(self.load_peak_4bit, packed)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses[self.global_step] = loss.item()
        return loss


class Snapshot(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, CausalLM) and pl_module.model is not None
        state = full_state_dict(pl_module)  # a collective: every rank calls it
        torch.save(
            {
                "world_size": trainer.world_size,
                "load_peak_4bit_bytes": pl_module.load_peak_4bit,
                "load_stats_bytes": pl_module.load_stats,
                "state": state,
                "adapters": {k: v for k, v in state.items() if "lora_" in k},
                "losses": pl_module.losses,
                "refusal": pl_module.refusal,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--strategy", default="qlora_fsdp")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning_qlora").setLevel(logging.WARNING)

    strategy: Any = args.strategy
    if args.strategy == "qlora_fsdp":
        from lightning_qlora import QLoRAFSDPStrategy

        strategy = QLoRAFSDPStrategy(timeout=datetime.timedelta(seconds=120))
    lora = LoRA(r=4, alpha=8, dropout=0.0, adapter_only_checkpoints=False, export_dir=args.out / "peft")
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=STEPS,
        plugins=[QLoRAPrecision(compute_dtype="float32", log_report=False)],
        callbacks=[
            lora,
            Snapshot(args.out),
            ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=STEPS, save_top_k=-1),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    # Adam moves a weight by about lr * g / (|g| + eps): for a gradient element near zero, whose last bits
    # depend on the reduction order (two halves of the batch summed, or the whole batch at once), eps=1e-8
    # would turn that rounding into updates of up to lr (seen: 1e-5 apart after 3 steps at lr 1e-2). A larger
    # eps and lr 1e-3 keep the comparison about the training, not the summation order.
    trainer.strategy.optimizer_config = OptimizerConfig(lr=1e-3, eps=1e-6)
    world = args.devices * args.num_nodes
    rank = int(os.environ.get("NODE_RANK", "0")) * args.devices + int(os.environ.get("LOCAL_RANK", "0"))
    generator = torch.Generator().manual_seed(7)
    batches = torch.randint(1, 128, (STEPS, ROWS, TOKENS), generator=generator)  # vocab of tiny_llama
    mine = [batch[rank::world] for batch in batches]  # this rank's rows of each batch
    loader = torch.utils.data.DataLoader(mine, batch_size=None)
    seed_everything(0, workers=True)  # the same adapter draw with one process and with several
    trainer.fit(CausalLM(args.model_dir), loader)


if __name__ == "__main__":
    main()
