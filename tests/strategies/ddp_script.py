"""A 2-process CPU (gloo) DDP fit with QLoRAPrecision + LoRA + strategy "qlora_ddp", for test_strategy_ddp.py.

Lightning starts the second process by running this script again (its subprocess launcher), so it has to be
a file, not a pytest test. Each rank writes what it saw to `OUT/rank<r>.pt`; the test compares the files.

    python ddp_script.py OUT [--max-steps N] [--ckpt-every K] [--resume CKPT]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from strategy_helpers import TinyModule, dataloader  # this script's folder is on sys.path
from torch.nn.parallel import DistributedDataParallel

from lightning_qlora import LoRA, OptimizerConfig, QLoRADDPStrategy, QLoRAPrecision
from lightning_qlora.quantization.layers import dequantize_weight, is_linear4bit


class RecordingCheckpointIO(TorchCheckpointIO):
    """Notes which rank writes each checkpoint file (Lightning should call it on rank 0 only)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with open(self.out / f"saved_by_rank{os.environ.get('LOCAL_RANK', '0')}.txt", "a") as f:
            f.write(f"{Path(path).name}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


class Snapshot(Callback):
    """Each rank saves its adapters, its dequantized 4-bit base weights and its losses when training ends."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, TinyModule)
        strategy = trainer.strategy
        assert isinstance(strategy.model, DistributedDataParallel)
        logged = strategy.model._get_ddp_logging_data()
        torch.save(
            {
                "world_size": trainer.world_size,
                "strategy": type(strategy).__name__,
                "backend": getattr(strategy, "process_group_backend", None),
                "ddp_wrapped": type(strategy.model).__name__,
                # what DDP all-reduces: its reducer holds the parameters that require grad, nothing else
                "ddp_reduced": {
                    k: logged[k] for k in ("num_parameter_tensors", "total_parameter_size_bytes")
                },
                "optimizer": type(trainer.optimizers[0]).__name__,
                "gradient_clip_val": trainer.gradient_clip_val,
                "adapters": {
                    k: v.detach().clone() for k, v in pl_module.state_dict().items() if "lora_" in k
                },
                "base": {
                    name: dequantize_weight(module, torch.float32)
                    for name, module in pl_module.named_modules()
                    if is_linear4bit(module)
                },
                "losses": pl_module.losses,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning_qlora").setLevel(logging.WARNING)

    seed_everything(0, workers=True)
    module = TinyModule(blocks=1)
    if os.environ.get("LOCAL_RANK", "0") == "0" and args.resume is None:
        # the full-precision weights the 4-bit base is made from, to compare with after training
        initial = {f"model.{i}": module.model[i].weight.detach().clone() for i in (0, 3)}
        initial |= {
            f"model.2.{n}": getattr(module.model[2], n).weight.detach().clone() for n in ("up", "down")
        }
        torch.save(initial, args.out / "initial_fp32.pt")
    callbacks: list[Callback] = [LoRA(r=4, alpha=8, dropout=0.0), Snapshot(args.out)]
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.ckpt_every, save_top_k=-1)
        )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="qlora_ddp",
        max_steps=args.max_steps,
        plugins=[QLoRAPrecision(compute_dtype="float32", log_report=False), RecordingCheckpointIO(args.out)],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert isinstance(trainer.strategy, QLoRADDPStrategy)
    # a rate at which 12 steps visibly train, and a schedule whose state the resume has to restore
    trainer.strategy.optimizer_config = OptimizerConfig(lr=1e-2, scheduler="cosine", warmup_steps=2)
    # 48 samples, batches of 4: DistributedSampler(shuffle=False) gives each rank 6 batches an epoch
    trainer.fit(module, dataloader(samples=48, batch_size=4), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
