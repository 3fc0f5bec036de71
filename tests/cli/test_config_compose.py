"""Every config file in conf/ composes, and the parts it describes can be built from it."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora.cli import conf_dir
from lightning_qlora.cli.job import build_loggers, build_strategy
from lightning_qlora.strategies import OptimizerConfig, QLoRADDPStrategy, QLoRAFSDPStrategy, QLoRAStrategy

CONF = conf_dir()
Compose = Callable[..., DictConfig]


def _config_files() -> list[str]:
    return sorted(str(p.relative_to(CONF).with_suffix("")) for p in CONF.rglob("*.yaml"))


CONFIG_FILES = _config_files()


def _overrides(name: str) -> list[str]:
    """The primary config as is; a group option selected by its group (`experiment=x`, `lora=small`)."""
    if name == "train":
        return []
    group, _, option = name.rpartition("/")
    return [f"{group}={option}"]


def test_every_config_file_is_covered() -> None:
    on_disk = sum(1 for _, _, files in os.walk(CONF) for f in files if f.endswith(".yaml"))
    assert len(CONFIG_FILES) == on_disk
    groups = {name.rpartition("/")[0] for name in CONFIG_FILES if "/" in name}
    expected = {
        "precision",
        "lora",
        "optimizer",
        "model",
        "data",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
    }
    assert expected <= groups
    assert len(CONFIG_FILES) >= 1 + 4 + 2 + 3 + 2 + 2 + 3 + 3 + 2 + 3
    assert not [p for p in CONF.rglob("*") if p.is_file() and p.suffix != ".yaml"]


def _check_kwargs(node: DictConfig) -> None:
    """The node's keys are arguments of its `_target_` (without building it: loading a model is slow)."""
    target = get_class(node._target_)
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    inspect.signature(target).bind(**kwargs)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_composes_and_builds(name: str, compose_train: Compose, tmp_path: Path) -> None:
    cfg = compose_train(*_overrides(name))
    OmegaConf.resolve(cfg)  # every interpolation resolves (except Hydra's own node, not in cfg)

    precision = instantiate(cfg.precision) if cfg.precision is not None else None
    if precision is not None:
        assert isinstance(precision, QLoRAPrecision)
        assert precision.config.quant_type == cfg.precision.quant_type
    lora = instantiate(cfg.lora)
    assert isinstance(lora, LoRA)
    assert lora.config.r == cfg.lora.r
    assert lora.export_dir == tmp_path / "adapter"
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, OptimizerConfig)
    assert optimizer.lr == cfg.optimizer.lr
    strategy = build_strategy(cfg.trainer.strategy, optimizer)
    assert isinstance(strategy, (QLoRAStrategy, QLoRADDPStrategy, QLoRAFSDPStrategy))
    assert strategy.optimizer_config == optimizer
    for node in cfg.callbacks.values():
        assert isinstance(instantiate(node), Callback)
    loggers = build_loggers(cfg.logger)
    assert all(isinstance(lg, Logger) for lg in loggers)
    assert len(loggers) == (0 if cfg.logger is None else 1)
    _check_kwargs(cfg.model)
    _check_kwargs(cfg.data)
    trainer_kwargs: dict[str, Any] = {
        k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if not k.startswith("_")
    }
    inspect.signature(get_class(cfg.trainer._target_)).bind(**trainer_kwargs)
    if cfg.trainer.accelerator == "cpu" or torch.cuda.is_available():
        trainer = instantiate(
            cfg.trainer,
            strategy=strategy,
            plugins=[precision] if precision is not None else None,
            logger=loggers or False,
        )
        assert trainer.max_steps == cfg.trainer.max_steps


def test_default_is_the_sentiment_qlora_experiment(compose_train: Compose) -> None:
    default = compose_train()
    explicit = compose_train("experiment=sentiment_qlora")
    assert default == explicit
    assert default.task_name == "sentiment_qlora"
    assert default.precision.quant_type == "nf4"
    assert default.precision.double_quant
    assert default.lora.modules_to_save == ["classifier"]
    assert default.model._target_.endswith("TextClassifier")
    assert default.metric.name == "val/acc"


def test_without_experiment_the_group_defaults_are_the_papers(compose_train: Compose) -> None:
    cfg = compose_train("~experiment")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16.0, 0.1)
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("paged_adamw", 2e-4)
    assert cfg.trainer.strategy.max_grad_norm == 0.3


def test_group_choices_on_the_command_line_win_over_the_experiment(compose_train: Compose) -> None:
    cfg = compose_train("lora=default", "precision=fp4", "optimizer=adamw")
    assert cfg.lora.r == 64
    assert cfg.precision.quant_type == "fp4"
    assert cfg.optimizer.name == "adamw"
    assert cfg.optimizer.lr == 3e-3  # the experiment's value still applies


def test_lora32_baseline_is_unquantized_sentiment(compose_train: Compose) -> None:
    cfg = compose_train("experiment=lora32_baseline")
    base = compose_train()
    assert cfg.precision is None
    assert cfg.task_name == "lora32_baseline"
    assert cfg.lora == base.lora
    assert cfg.optimizer == base.optimizer
    assert cfg.model == base.model


def test_causal_lm_shares_its_tokenizer_with_the_data(compose_train: Compose) -> None:
    cfg = compose_train("experiment=smoke_tiny_llama", "model.pretrained_path=/models/llama")
    assert cfg.model.tokenizer_path == "/models/llama"
    assert cfg.data.tokenizer_path == "/models/llama"
    assert cfg.lora.modules_to_save == []
    assert cfg.metric.mode == "min"


def test_classifier_path_is_the_tokenizer_path(compose_train: Compose) -> None:
    cfg = compose_train("model.pretrained_path=/models/minilm")
    assert cfg.data.tokenizer_path == "/models/minilm"


def test_the_optimizer_reaches_the_strategy_as_configured(compose_train: Compose) -> None:
    cfg = compose_train("optimizer=paged_adamw_8bit", "optimizer.betas=[0.8,0.99]", "trainer=ddp")
    strategy = build_strategy(cfg.trainer.strategy, instantiate(cfg.optimizer))
    assert isinstance(strategy, QLoRADDPStrategy)
    assert strategy.optimizer_config.name == "paged_adamw_8bit"
    assert strategy.optimizer_config.betas == (0.8, 0.99)


def test_the_default_model_and_data_build(compose_train: Compose) -> None:
    cfg = compose_train()
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    assert type(model).__name__ == "TextClassifier"
    assert hasattr(model, "classifier")
    assert datamodule.batch_size == cfg.data.batch_size


def test_the_tiny_causal_lm_builds(compose_train: Compose) -> None:
    cfg = compose_train("experiment=smoke_tiny_llama")
    model = instantiate(cfg.model)
    assert model.model.config.hidden_size == 64
    assert instantiate(cfg.data).tokenizer_path.name == "model"  # the bundled MiniLM tokenizer folder


def test_build_names_the_node_that_failed(compose_train: Compose, tmp_path: Path) -> None:
    """The CLI prints this message as its one-line error (see test_train_cli)."""
    from lightning_qlora.cli.job import SetupError, build

    missing = tmp_path / "nowhere"
    with pytest.raises(SetupError) as info:
        build(compose_train(f"model.pretrained_path={missing}"))
    assert info.value.component == "model"
    assert isinstance(info.value.error, FileNotFoundError)
    assert str(info.value).startswith("model: FileNotFoundError: ")
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(SetupError, match=r"^optimizer: ValueError: .*nadam"):
        build(compose_train("optimizer.name=nadam"))
    with pytest.raises(SetupError, match=r"^precision: ValueError: .*blocksize"):
        build(compose_train("precision.blocksize=63"))


def test_pattern_errors_during_the_run_blame_the_lora_node() -> None:
    from lightning_qlora.cli.job import run_config_errors
    from lightning_qlora.lora import PatternMatchError

    assert run_config_errors()[PatternMatchError] == "lora"
