"""A 2-process CPU (gloo) DDP fit whose 4-bit layers run the workspace path, with activation checkpointing.

Run by test_cpu_path_ddp.py (Lightning re-runs this file for the second rank, so it is a script). Each rank
writes what it saw to `OUT/rank<r>.pt`.

    python ddp_cpu_path_script.py OUT
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from strategy_helpers import Block, TinyModule, dataloader

from lightning_qlora import LoRA, QLoRADDPStrategy, QLoRAPrecision
from lightning_qlora.quantization.layers import dequantize_weight, is_linear4bit
from lightning_qlora.quantization.workspace import workspace_bytes


class Probe(Callback):
    """Records which autograd function the 4-bit layers' outputs came from, and what each rank ends with."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.grad_fns: set[str] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in pl_module.modules():
            if is_linear4bit(module):
                module.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and args[0].requires_grad:  # else no graph is needed, nor made
            self.grad_fns.add(type(output.grad_fn).__name__)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, TinyModule)
        torch.save(
            {
                "grad_fns": sorted(self.grad_fns),
                "layer_types": sorted({type(m).__name__ for m in pl_module.modules() if is_linear4bit(m)}),
                "workspace_bytes": workspace_bytes(),
                "block_forwards": Block.forward_calls,
                "adapters": {
                    k: v.detach().clone() for k, v in pl_module.state_dict().items() if "lora_" in k
                },
                "base": {
                    n: dequantize_weight(m, torch.float32)
                    for n, m in pl_module.named_modules()
                    if is_linear4bit(m)
                },
                "losses": pl_module.losses,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning_qlora").setLevel(logging.WARNING)
    seed_everything(0, workers=True)
    module = TinyModule(blocks=2)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=QLoRADDPStrategy(activation_checkpointing=Block),
        max_steps=6,
        plugins=[QLoRAPrecision(compute_dtype="float32", log_report=False)],
        callbacks=[LoRA(r=4, alpha=8, dropout=0.0), Probe(out)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dataloader(samples=48, batch_size=4))


if __name__ == "__main__":
    main()
