"""A model loaded in eval mode (`from_pretrained` returns one) still trains in training mode.

Lightning 2.6 keeps every submodule's mode through fit; activation checkpointing recomputes only in
training mode and adapter dropout is off in eval mode, so both would silently do nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import seed_everything
from strategies.strategy_helpers import Block, TinyModule, dataloader, trainer
from tiny_models import tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy
from lightning_qlora.lora import LoRALinear


def test_blocks_of_an_eval_mode_module_are_recomputed(caplog: pytest.LogCaptureFixture) -> None:
    seed_everything(0)
    module = TinyModule(blocks=2).eval()
    counts: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            Block.forward_calls = 0

        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            counts.append(Block.forward_calls)

    with caplog.at_level(logging.INFO, logger="lightning_qlora"):
        trainer(QLoRAStrategy(activation_checkpointing=Block), max_steps=2, callbacks=[Count()]).fit(
            module, dataloader()
        )
    assert counts == [4, 4]  # two blocks, each run in forward and again in backward
    switched = [r.message for r in caplog.records if "switched TinyModule to training mode" in r.message]
    assert len(switched) == 1, switched  # said once, by the first of LoRA and the strategy to see it
    assert "activation checkpointing (non-reentrant) on 2 module(s) of class Block" in caplog.text


class PretrainedLM(pl.LightningModule):
    """A user's module around a `from_pretrained` model, which comes back in eval mode."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.adapter_modes: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.adapter_modes += [m.training for m in self.modules() if isinstance(m, LoRALinear)]
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_from_pretrained_llama_is_checkpointed_and_its_adapters_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_llama().save_pretrained(tmp_path / "llama")
    module = PretrainedLM(tmp_path / "llama")
    assert not module.model.training  # as from_pretrained leaves it
    calls = {"n": 0}
    forward = LlamaDecoderLayer.forward

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counting)
    ids = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        plugins=[QLoRAPrecision(compute_dtype="float32")],
        strategy=QLoRAStrategy(activation_checkpointing=LlamaDecoderLayer),
        callbacks=[LoRA(r=8)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader)
    assert calls["n"] == 2 * 2 * 2  # 2 steps x 2 layers x (forward + recomputation in backward)
    assert module.adapter_modes and all(module.adapter_modes)  # adapter dropout on
