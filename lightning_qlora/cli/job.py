"""Build the parts of a training job from the composed config, cheapest and most error-prone first.

Precision, LoRA and optimizer settings are checked by their constructors in milliseconds, so a bad value
fails before the (slow) model is loaded. Every failure is re-raised as a `SetupError` naming the config
node it came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.cli.throughput import TokenThroughput
from lightning_qlora.lora.callback import LoRA

# Errors that mean "this config is wrong" (a missing folder, a bad value, an unknown argument, a pattern
# that names no module) when raised while building, as opposed to bugs during training.
SETUP_ERRORS: tuple[type[Exception], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
    ImportError,
    AttributeError,
    InstantiationException,
    MisconfigurationException,
)


def run_config_errors() -> dict[type[Exception], str]:
    """Errors raised once training starts that still mean "this config is wrong", and the node to blame."""
    from lightning_qlora.lora.inject import PatternMatchError
    from lightning_qlora.quantization.convert import NoLinearLayersError
    from lightning_qlora.strategies import NoTrainableParametersError

    return {PatternMatchError: "lora", NoTrainableParametersError: "lora", NoLinearLayersError: "model"}


class SetupError(RuntimeError):
    """A config node could not be built; the message is one line: node, error type, root cause."""

    def __init__(self, component: str, error: BaseException) -> None:
        self.component = component
        self.error = root_cause(error)
        super().__init__(f"{component}: {type(self.error).__name__}: {_one_line(self.error)}")


def root_cause(error: BaseException) -> BaseException:
    """The user's error inside Hydra's `InstantiationException` wrapping."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return " ".join(str(error).split())


@contextmanager
def building(component: str) -> Iterator[None]:
    try:
        yield
    except SETUP_ERRORS as err:
        raise SetupError(component, err) from err


class FitValidation(Callback):
    """Keep the metrics of the last validation inside `fit` and the step it ran at.

    When fit ended right after a validation (at the end of its last epoch), those are the tuned metrics
    and the job need not run the same validation again.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, Any] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.step = trainer.global_step
        self.metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}


@dataclass
class JobParts:
    """Everything `train` needs; the callbacks are kept by role for the summary."""

    precision: Any | None
    lora: LoRA
    throughput: TokenThroughput | None
    fit_validation: FitValidation
    datamodule: pl.LightningDataModule
    model: pl.LightningModule
    loggers: list[Logger]
    trainer: pl.Trainer


def build(cfg: DictConfig) -> JobParts:
    """Precision plugin, LoRA, optimizer, strategy, callbacks, logger, Trainer, then data and model."""
    with building("precision"):
        precision = instantiate(cfg.precision) if cfg.precision is not None else None
    with building("lora"):
        lora = instantiate(cfg.lora)
    with building("optimizer"):
        optimizer = instantiate(cfg.optimizer) if cfg.optimizer is not None else None
    with building("trainer.strategy"):
        strategy = build_strategy(cfg.trainer.strategy, optimizer)
    fit_validation = FitValidation()
    callbacks: list[Callback] = [lora, fit_validation]
    for name, node in (cfg.callbacks or {}).items():
        if node is not None:
            with building(f"callbacks.{name}"):
                callbacks.append(instantiate(node))
    with building("logger"):
        loggers = build_loggers(cfg.logger)
    extra: dict[str, Any] = {}
    if cfg.validate_before and cfg.trainer.num_sanity_val_steps is None:
        extra["num_sanity_val_steps"] = 0  # the full validation before fit already ran the same code
    with building("trainer"):  # before the model: a wrong accelerator should not wait for a model load
        trainer = instantiate(
            cfg.trainer,
            **extra,
            strategy=strategy,
            plugins=[precision] if precision is not None else None,
            callbacks=callbacks,
            logger=loggers or False,
        )
    with building("data"):
        datamodule = instantiate(cfg.data)
    with building("model"):
        model = instantiate(cfg.model)
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    return JobParts(precision, lora, throughput, fit_validation, datamodule, model, loggers, trainer)


def build_strategy(node: Any, optimizer: Any) -> Any:
    """A `_target_` node gets the optimizer config built above; a name ("qlora", "auto") goes to Lightning."""
    if isinstance(node, DictConfig) and "_target_" in node:
        if "optimizer" not in node and not _is_qlora(node):
            return instantiate(node)
        # a plain dict: the built OptimizerConfig replaces the (typed) `${optimizer}` node it came from
        spec = OmegaConf.to_container(node, resolve=True)
        assert isinstance(spec, dict)
        spec.pop("optimizer", None)
        return instantiate(spec, optimizer=optimizer)
    return OmegaConf.to_container(node) if isinstance(node, DictConfig) else node


def _is_qlora(node: DictConfig) -> bool:
    return str(node.get("_target_", "")).startswith("lightning_qlora.")


def build_loggers(node: Any) -> list[Logger]:
    """None/false: no logger; a `_target_` node: one; a mapping of such nodes: several."""
    if node is None or node is False:
        return []
    nodes = [node] if "_target_" in node else [n for n in node.values() if n is not None]
    if any("WandbLogger" in str(n.get("_target_", "")) for n in nodes):
        _quiet_wandb(nodes)
    return [instantiate(n) for n in nodes]


def _quiet_wandb(nodes: list[Any]) -> None:
    """Never let wandb stop at a login prompt: an offline logger also sets WANDB_MODE for wandb's service."""
    os.environ.setdefault("WANDB_SILENT", "true")
    for n in nodes:
        if "WandbLogger" in str(n.get("_target_", "")) and n.get("offline", False):
            os.environ.setdefault("WANDB_MODE", "offline")


def finish_loggers(loggers: list[Logger]) -> None:
    """Close wandb runs so that the next job of a multirun starts a new one."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()
