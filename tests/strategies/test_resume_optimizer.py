"""Resuming with another optimizer than the checkpoint's is refused before its state is loaded.

paged_adamw -> adamw crashed inside the optimizer; paged_adamw -> paged_adamw_8bit silently kept 32-bit
state. The LoRA callback records the strategy's optimizer in the checkpoint and compares it on resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from strategies.strategy_helpers import TinyModule, dataloader, trainer

from lightning_qlora import OptimizerConfig, QLoRAStrategy
from lightning_qlora.lora.resume_checks import ResumeMismatchError


def base() -> TinyModule:
    torch.manual_seed(0)  # the same frozen base every time: only the optimizer differs
    return TinyModule()


def strategy(name: str) -> QLoRAStrategy:
    return QLoRAStrategy(optimizer=OptimizerConfig(name=name))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = trainer(strategy("paged_adamw"), max_steps=2)
    run.fit(base(), dataloader())
    path = tmp_path_factory.mktemp("first") / "paged_adamw.ckpt"
    run.save_checkpoint(path)
    return path


@pytest.mark.parametrize("other", ["adamw", "paged_adamw_8bit"])
def test_resuming_with_another_optimizer_is_refused(checkpoint: Path, other: str) -> None:
    module = base()
    message = rf"holds paged_adamw's optimizer state and this run builds {other}: .*optimizer=paged_adamw"
    with pytest.raises(ResumeMismatchError, match=message):
        trainer(strategy(other), max_steps=4).fit(module, dataloader(), ckpt_path=checkpoint)
    assert module.losses == {}  # not a step


def test_resuming_with_the_same_optimizer_by_its_alias_works(checkpoint: Path) -> None:
    module = base()
    trainer(strategy("paged_adamw_32bit"), max_steps=4).fit(module, dataloader(), ckpt_path=checkpoint)
    assert sorted(module.losses) == [2, 3]
