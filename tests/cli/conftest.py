"""Composing the packaged Hydra configs in-process, with the run folder pointed at a temporary path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lightning_qlora.cli import conf_dir


@pytest.fixture
def compose_train(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """`compose_train("lora=small", ...)`: the primary config with overrides, outputs under tmp_path."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):

        def _compose(*overrides: str) -> DictConfig:
            return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])

        yield _compose
