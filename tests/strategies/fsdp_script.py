"""A CPU (gloo) fit with QLoRAPrecision + LoRA + strategy "qlora_fsdp" (or "qlora" as the reference), for
test_fsdp_training.py.

Lightning starts the other processes by running this script again (its subprocess launcher), so it has to
be a file, not a pytest test. Each rank writes what it saw to `OUT/rank<r>.pt`; the tests compare the files.

    python fsdp_script.py OUT [--strategy qlora_fsdp|qlora] [--devices N] [--max-steps N] [--ckpt-every K]
                              [--resume CKPT] [--export] [--kill-rank R --kill-step S]
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

from lightning_qlora import LoRA, OptimizerConfig, QLoRAPrecision
from lightning_qlora.quantization.layers import is_linear4bit
from lightning_qlora.strategies.fsdp_state import full_state_dict

try:  # run as a script: its folder is on sys.path
    from strategy_helpers import TinyModule, dataloader
except ImportError:  # imported by the tests (which run the single-process reference in-process)
    from strategies.strategy_helpers import TinyModule, dataloader


class Snapshot(Callback):
    """Each rank saves the whole adapters, the whole packed 4-bit bytes and its own shard sizes at the end."""

    def __init__(self, out: Path, norms: GradNorms) -> None:
        self.out = out
        self.norms = norms

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, TinyModule)
        state = full_state_dict(pl_module)  # a collective: every rank calls it
        local_4bit = 0
        whole_4bit = 0
        stats = 0
        for sub in pl_module.modules():
            if is_linear4bit(sub):
                weight = sub.weight
                local = weight.to_local() if isinstance(weight, DTensor) else weight
                local_4bit += local.numel() * local.element_size()
                whole_4bit += weight.numel() * weight.element_size()
                state_ = sub.quant_state
                stats += sum(
                    t.numel() * t.element_size()
                    for t in state_.as_dict(packed=True).values()
                    if isinstance(t, torch.Tensor)
                )
        torch.save(
            {
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "backend": getattr(trainer.strategy, "process_group_backend", None),
                "optimizer": type(trainer.optimizers[0]).__name__,
                "gradient_clip_val": trainer.gradient_clip_val,
                "adapters": {k: v for k, v in state.items() if "lora_" in k},
                "packed": {
                    k: v for k, v in state.items() if k.endswith(".weight") and v.dtype == torch.uint8
                },
                "state": state,
                "local_4bit_bytes": local_4bit,
                "whole_4bit_bytes": whole_4bit,
                "stats_bytes": stats,
                "losses": pl_module.losses,
                "grad_norms": self.norms.norms,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class GradNorms(Callback):
    """The gradients' total norm before clipping, each step (a DTensor norm is reduced over the ranks)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        self.norms[trainer.global_step] = float(norm)


class KillAt(Callback):
    """Ends one rank abruptly (as a crash or an OOM kill would) at a given step."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", default="qlora_fsdp")
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (NCCL)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="process-group timeout, seconds")
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-step", type=int, default=-1)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning_qlora").setLevel(logging.WARNING)

    seed_everything(0, workers=True)
    module = TinyModule(blocks=2)
    lora = LoRA(r=4, alpha=8, dropout=0.0, export_dir=args.out / "peft" if args.export else None)
    norms = GradNorms()
    callbacks: list[Callback] = [lora, norms, Snapshot(args.out, norms)]
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.ckpt_every, save_top_k=-1)
        )
    if args.kill_rank >= 0:
        callbacks.append(KillAt(args.kill_rank, args.kill_step))
    strategy: Any = args.strategy
    if args.strategy == "qlora_fsdp":
        from lightning_qlora import QLoRAFSDPStrategy

        strategy = QLoRAFSDPStrategy(shard="Block", timeout=datetime.timedelta(seconds=args.timeout))
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps,
        plugins=[QLoRAPrecision(compute_dtype="float32", log_report=False)],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    # a rate at which the steps visibly train, and a schedule whose state the resume has to restore
    trainer.strategy.optimizer_config = OptimizerConfig(lr=1e-2, scheduler="cosine", warmup_steps=2)
    # every process sees the same batches of `batch_size * world` samples and trains on its slice of them
    # (rank r: samples r, r + world, ...), so N processes see the global batch one process sees
    world = args.devices * args.num_nodes
    rank = int(os.environ.get("NODE_RANK", "0")) * args.devices + int(os.environ.get("LOCAL_RANK", "0"))
    # three global batches an epoch, so a checkpoint every 3 steps ends an epoch and a resume is exact
    full = dataloader(samples=3 * args.batch_size * world, batch_size=args.batch_size * world)
    sliced = [(x[rank::world], y[rank::world]) for x, y in full]
    loader = torch.utils.data.DataLoader(sliced, batch_size=None)  # the batches as they are
    # Lightning re-seeds parallel runs when it sets up the process group; seed every run the same way right
    # before fit, so the adapters start from the same draw with one process and with several
    seed_everything(0, workers=True)
    trainer.fit(module, loader, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
