"""Activation checkpointing by the strategies: same numbers, same names, and really recomputed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from strategies.strategy_helpers import Block, TinyModule, dataloader, trainer

from lightning_qlora import QLoRAStrategy
from lightning_qlora.strategies.hook import (
    ActivationCheckpointing,
    activation_checkpoint_targets,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)


class GradRecorder(Callback):
    """The first step's loss and gradients, before clipping and the optimizer touch them."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self.keys: list[str] = []
        self.block_forwards = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            Block.forward_calls = 0

    def on_after_backward(self, trainer: Trainer, pl_module: pl.LightningModule) -> None:
        if self.grads:
            return
        self.block_forwards = Block.forward_calls
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.names = [n for n, _ in pl_module.named_parameters()]
        self.keys = list(pl_module.state_dict())


def _one_step(checkpointing: ActivationCheckpointing, quantize: bool) -> tuple[GradRecorder, TinyModule]:
    seed_everything(0)
    module = TinyModule(blocks=2)
    record = GradRecorder()
    strategy = QLoRAStrategy(activation_checkpointing=checkpointing)
    trainer(strategy, max_steps=1, quantize=quantize, callbacks=[record]).fit(module, dataloader())
    return record, module


@pytest.mark.parametrize(
    ("spec", "quantize"),
    [(Block, True), ("Block", False), (["Block"], True)],
    ids=["class-qlora", "name-lora", "list-qlora"],
)
def test_same_loss_and_gradients_names_unchanged(quantize: bool, spec: ActivationCheckpointing) -> None:
    plain, plain_module = _one_step(None, quantize)
    ckpt, ckpt_module = _one_step(spec, quantize)
    assert plain.block_forwards == 2  # two blocks, one forward each
    assert ckpt.block_forwards == 4  # and once more each in backward: the activations were recomputed
    assert ckpt_module.losses[0] == pytest.approx(plain_module.losses[0], abs=1e-6)
    assert ckpt.grads.keys() == plain.grads.keys()
    assert len(plain.grads) == 12
    for name, grad in plain.grads.items():
        torch.testing.assert_close(ckpt.grads[name], grad, rtol=1e-5, atol=1e-7)
    # no wrapper module in the tree: parameter names and state-dict keys stay the model's (and PEFT's)
    assert ckpt.names == plain.names
    assert ckpt.keys == plain.keys
    assert not any("_checkpoint_wrapped_module" in k for k in ckpt.keys)
    # the model is given back with its own forward after fit
    assert all("forward" not in m.__dict__ for m in ckpt_module.modules())


def test_adapter_checkpoint_keeps_its_keys(tmp_path: Path) -> None:
    """The LoRA callback filters checkpoints by parameter name; checkpointing must not rename parameters."""
    seed_everything(0)
    module = TinyModule(blocks=2)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    fit = trainer(
        QLoRAStrategy(activation_checkpointing="Block"),
        max_steps=2,
        callbacks=[saver],
        enable_checkpointing=True,
    )
    fit.fit(module, dataloader())
    state = torch.load(saver.best_model_path or next(tmp_path.glob("*.ckpt")), weights_only=True)[
        "state_dict"
    ]
    assert len(state) == 12
    assert all("lora_" in k for k in state)
    assert "model.2.up.lora_A" in state


def test_unknown_class_name_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"no module of class 'Blok' in TinyModule\. Classes present: .*'Block'"
    ):
        trainer(QLoRAStrategy(activation_checkpointing="Blok"), max_steps=1).fit(
            TinyModule(blocks=1), dataloader()
        )
    with pytest.raises(ValueError, match=r"no module of class 'Conv2d'"):
        activation_checkpoint_targets(TinyModule(blocks=1), torch.nn.Conv2d)
    with pytest.raises(TypeError, match="takes module classes or class names"):
        QLoRAStrategy(activation_checkpointing=cast(Any, [3]))


def test_outermost_matches_only_and_copies_stay_independent() -> None:
    module = TinyModule(blocks=2)
    # Linear matches the blocks' layers and the outer ones; Block and Linear together: blocks win inside
    targets = activation_checkpoint_targets(module, [Block, "Linear"])
    assert [type(t).__name__ for t in targets] == ["Linear", "Block", "Block", "Linear"]
    block = module.model[2]
    enable_activation_checkpointing(block)
    enable_activation_checkpointing(block)  # idempotent
    twin = copy.deepcopy(block)
    assert twin.__dict__["forward"].module is twin  # a deep copy checkpoints itself, not the original
    x = torch.randn(3, 64, requires_grad=True)
    torch.testing.assert_close(twin(x), block(x))
    disable_activation_checkpointing(block)
    assert "forward" not in block.__dict__
