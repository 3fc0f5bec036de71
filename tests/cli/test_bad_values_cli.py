"""Config values Lightning would accept, refused by the command before anything is built."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from omegaconf import DictConfig

from lightning_qlora.cli.job import SetupError, build


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches must be a positive integer"),
        ("trainer.gradient_clip_val=-0.5", r"trainer.gradient_clip_val must be a finite number >= 0 or null"),
    ],
    ids=["accumulate-0", "negative-clip"],
)
def test_unusable_trainer_values_fail_in_the_trainer_node(
    compose_train: Callable[..., DictConfig], override: str, message: str
) -> None:
    cfg = compose_train("experiment=smoke_tiny_llama", "logger=none", override)
    with pytest.raises(SetupError, match=rf"^trainer: SettingTypeError: {message}"):
        build(cfg)
