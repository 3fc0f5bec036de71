"""`precision.keep_sensitive` reaches QLoRAPrecision from the command line, and bad values are refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_qlora import QLoRAPrecision

Compose = Callable[..., DictConfig]


def test_keep_sensitive_from_the_command_line(compose_train: Compose) -> None:
    assert compose_train().precision.keep_sensitive == 0.0
    precision = instantiate(compose_train("precision.keep_sensitive=0.05").precision)
    assert isinstance(precision, QLoRAPrecision)
    assert precision.config.keep_sensitive == 0.05


@pytest.mark.parametrize("bad", ["1.0", "-0.1"])
def test_bad_keep_sensitive_blames_the_precision_node(compose_train: Compose, bad: str) -> None:
    from lightning_qlora.cli.job import SetupError, build

    with pytest.raises(SetupError, match=r"^precision: ValueError: .*keep_sensitive must be in \[0, 1\)"):
        build(compose_train(f"precision.keep_sensitive={bad}"))


def test_a_word_for_keep_sensitive_is_refused_when_composing(compose_train: Compose) -> None:
    with pytest.raises(ConfigCompositionException, match="keep_sensitive"):
        compose_train("precision.keep_sensitive=lots")
