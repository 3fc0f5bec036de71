"""Trainer values Lightning accepts but a QLoRA run cannot use: refused (or warned about) before step 1."""

from __future__ import annotations

import pytest
from strategies.strategy_helpers import TinyModule, dataloader, trainer

from lightning_qlora import OptimizerConfig, QLoRAStrategy
from lightning_qlora._settings import SettingTypeError


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"accumulate_grad_batches": 0},
            r"Trainer accumulate_grad_batches must be a positive integer .* got 0",
        ),
        (
            {"gradient_clip_val": -1.0},
            r"Trainer gradient_clip_val must be a finite number >= 0 or null .* got -1.0",
        ),
    ],
    ids=["accumulate-0", "negative-clip"],
)
def test_unusable_trainer_values_are_refused_before_the_first_step(setting: dict, message: str) -> None:
    module = TinyModule()
    run = trainer(QLoRAStrategy(), **setting)
    with pytest.raises(SettingTypeError, match=message):
        run.fit(module, dataloader())
    assert module.losses == {}  # nothing trained


def test_a_warmup_as_long_as_the_run_is_named(qlora_log: pytest.LogCaptureFixture) -> None:
    module = TinyModule()
    trainer(QLoRAStrategy(optimizer=OptimizerConfig(warmup_steps=5)), max_steps=3).fit(module, dataloader())
    warnings = [
        r.getMessage() for r in qlora_log.records if r.levelname == "WARNING" and "warmup" in r.getMessage()
    ]
    assert warnings == [
        "warmup_steps=5 is not shorter than the run's 3 optimizer steps: the learning rate rises for the "
        "whole run and never reaches lr=0.0002. Lower warmup_steps, or use warmup_ratio."
    ]
    qlora_log.clear()
    trainer(QLoRAStrategy(optimizer=OptimizerConfig(warmup_steps=2)), max_steps=3).fit(
        TinyModule(), dataloader()
    )
    assert not [r for r in qlora_log.records if r.levelname == "WARNING"]
