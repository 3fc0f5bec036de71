"""The DoRA, variant and LoftQ settings from the command line: `lora=dora`, `lora.variant=NAME`,
`lora.init=loftq lora.loftq_iter=N`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_qlora import LoRA

Compose = Callable[..., DictConfig]


def test_lora_dora_sets_use_dora_and_keeps_the_defaults(compose_train: Compose) -> None:
    default, dora = compose_train("lora=default"), compose_train("lora=dora")
    assert dora.lora.use_dora is True
    assert {k: v for k, v in dora.lora.items() if k != "use_dora"} == {
        k: v for k, v in default.lora.items() if k != "use_dora"
    }
    callback = instantiate(dora.lora)
    assert isinstance(callback, LoRA) and callback.config.use_dora


def test_lora_init_loftq_from_the_command_line(compose_train: Compose) -> None:
    cfg = compose_train("lora=dora", "lora.init=loftq", "lora.loftq_iter=3")
    config = instantiate(cfg.lora).config
    assert (config.init, config.loftq_iter, config.use_dora) == ("loftq", 3, True)


def test_unknown_init_names_the_allowed_ones(compose_train: Compose) -> None:
    with pytest.raises(Exception, match=r"init 'pissa'.*allowed: default, loftq"):
        instantiate(compose_train("lora.init=pissa").lora)


def test_variant_by_name_asks_the_registry(compose_train: Compose) -> None:
    assert instantiate(compose_train("lora.variant=dora").lora).config.variant_name == "dora"
    with pytest.raises(Exception, match=r"Unknown LoRA variant 'qdora'; registered variants: dora, lora"):
        instantiate(compose_train("lora.variant=qdora").lora)
