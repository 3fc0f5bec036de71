"""Build the parts of a training job from the composed config, cheapest and most error-prone first.

Precision, LoRA and optimizer settings are checked by their constructors in milliseconds, so a bad value
fails before the (slow) model is loaded. Every failure is re-raised as a `SetupError` naming the config
node it came from.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickletools
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_qlora._export_dir import check_export_dir
from lightning_qlora._trainer_settings import check_trainer_settings
from lightning_qlora.cli.callbacks import FitValidation, RunDescription, ValidateAtLastStep
from lightning_qlora.cli.curves import CurveRecorder
from lightning_qlora.cli.interrupt import INTERRUPTED_CHECKPOINT, InterruptHandler
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
    from lightning_qlora.quantization.convert import ExcludePatternError, NoLinearLayersError
    from lightning_qlora.strategies import NoTrainableParametersError

    return {
        PatternMatchError: "lora",
        NoTrainableParametersError: "lora",
        NoLinearLayersError: "model",
        ExcludePatternError: "precision",
    }


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


@dataclass
class JobParts:
    """Everything `train` needs; the callbacks are kept by role for the summary."""

    precision: Any | None
    lora: LoRA
    throughput: TokenThroughput | None
    fit_validation: FitValidation
    interrupt: InterruptHandler
    curves: CurveRecorder | None
    datamodule: pl.LightningDataModule
    model: pl.LightningModule
    loggers: list[Logger]
    trainer: pl.Trainer


def build(cfg: DictConfig) -> JobParts:
    """Precision plugin, LoRA, optimizer, strategy, callbacks, logger, Trainer, then data (read and checked
    line by line) and, last, the model."""
    with building("trainer"):  # values Lightning accepts but no run can use: before anything is built
        check_trainer_settings(
            cfg.trainer.get("accumulate_grad_batches", 1), cfg.trainer.get("gradient_clip_val"), "trainer."
        )
    with building("precision"):
        precision = instantiate(cfg.precision) if cfg.precision is not None else None
    # The plugin would print its table at each validate and fit; RunDescription prints it once.
    print_report = bool(getattr(precision, "log_report", False))
    if print_report and precision is not None:
        precision.log_report = False
    with building("ckpt_path"):
        check_ckpt_path(cfg.ckpt_path)
    export_dir = OmegaConf.select(cfg, "lora.export_dir")
    if export_dir is not None:
        with building("lora.export_dir"):  # the export replaces its folder: never the run folder or a user's
            check_export_dir(export_dir, "lora.export_dir", run_dir=cfg.paths.output_dir)
    with building("lora"):
        lora = instantiate(cfg.lora)
    with building("optimizer"):
        optimizer = instantiate(cfg.optimizer) if cfg.optimizer is not None else None
    with building("trainer.strategy"):
        strategy = build_strategy(cfg.trainer.strategy, optimizer)
    fit_validation = FitValidation()
    run_dir = Path(cfg.paths.output_dir)
    interrupt = InterruptHandler(run_dir / "checkpoints" / INTERRUPTED_CHECKPOINT, lora)
    curves = CurveRecorder(cfg.metric.name) if cfg.plot_curves else None
    description = RunDescription(job_config(cfg), precision, print_report)
    callbacks: list[Callback] = [lora, fit_validation, ValidateAtLastStep(), interrupt, description]
    if curves is not None:
        callbacks.append(curves)
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
        read_records = getattr(datamodule, "read_records", None)
        if callable(read_records):  # the packaged data modules: every file problem before the model loads
            read_records()
        print_data_report(datamodule, trainer)
    with building("model"):
        model = instantiate(cfg.model)
    with building("data.max_length"):  # before training: positions past the model's fail mid-epoch
        check_max_length(datamodule, model)
    with building("lora.export_module"):  # a wrong name would otherwise fail only after training
        lora.check_export_module(model)
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    return JobParts(
        precision, lora, throughput, fit_validation, interrupt, curves, datamodule, model, loggers, trainer
    )


def check_max_length(datamodule: Any, model: Any) -> None:
    """Refuse a `max_length` beyond the model's position embeddings (`max_position_embeddings`)."""
    max_length = getattr(datamodule, "max_length", None)
    network = getattr(model, "model", model)
    positions = getattr(getattr(network, "config", None), "max_position_embeddings", None)
    if isinstance(max_length, int) and isinstance(positions, int) and max_length > positions:
        raise ValueError(
            f"data.max_length={max_length} is beyond the {positions} positions of the model "
            f"({type(network).__name__}: max_position_embeddings={positions}); longer examples would fail or "
            f"read garbage positions. Pass data.max_length={positions} or less."
        )


def print_data_report(datamodule: Any, trainer: pl.Trainer) -> None:
    """What the model will be trained on (examples, tokens, truncated, packing), before the model loads."""
    report = getattr(datamodule, "data_report", None)
    if not callable(report) or not trainer.is_global_zero:
        return
    from lightning_qlora.tasks.instruction import format_data_report

    logging.getLogger("lightning_qlora").info("%s", format_data_report(report()))


def job_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed job config, resolved, as plain containers (what the loggers receive, flattened)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A checkpoint to resume from must be one now, not after the model loaded and failed to resume."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):  # Lightning's own names
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} is not a file; pass the .ckpt a run wrote (e.g. <run>/checkpoints/"
            f"{INTERRUPTED_CHECKPOINT}, printed when a run is interrupted)"
        )
    check_checkpoint_file(path)


def check_checkpoint_file(path: Path) -> None:
    """An empty, truncated or foreign file, or one without a `state_dict`, refused without unpickling it.

    `torch.save` writes a zip archive whose central directory is at the end (a truncated file has none)
    and whose `data.pkl` names the top-level keys; the pickle is only scanned for strings, never run.
    """
    what = "pass the .ckpt a Lightning run wrote"
    if path.stat().st_size == 0:
        raise ValueError(f"ckpt_path={path} is empty (0 bytes); {what}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"ckpt_path={path} is not a checkpoint torch.save wrote (no zip archive: truncated, or another "
            f"format); {what}."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.rpartition("/")[2] == "data.pkl"]
            record = archive.read(pickles[0]) if pickles else b"N."  # an empty pickle: None
        strings = (
            {arg for _, arg, _ in pickletools.genops(record) if isinstance(arg, str)} if record else set()
        )
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"ckpt_path={path} is damaged ({type(err).__name__}: {err}); {what}.") from err
    if not pickles:
        raise ValueError(f"ckpt_path={path} holds no data.pkl: not a torch checkpoint; {what}.")
    if "state_dict" not in strings:
        raise ValueError(
            f"ckpt_path={path} has no 'state_dict': it is not a Lightning checkpoint (a plain torch.save of "
            f"weights?); {what}, or load weights with load_peft_adapter / load_quantized."
        )


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
    if any("TensorBoardLogger" in str(n.get("_target_", "")) for n in nodes):
        _check_tensorboard()
    return [instantiate(n) for n in nodes]


def _quiet_wandb(nodes: list[Any]) -> None:
    """Never let wandb stop at a login prompt: an offline logger also sets WANDB_MODE for wandb's service."""
    os.environ.setdefault("WANDB_SILENT", "true")
    for n in nodes:
        if "WandbLogger" in str(n.get("_target_", "")) and n.get("offline", False):
            os.environ.setdefault("WANDB_MODE", "offline")


def _check_tensorboard() -> None:
    """Lightning's TensorBoardLogger writes with `tensorboard` or `tensorboardX`: say so before the run."""
    for name in ("tensorboard", "tensorboardX"):
        try:
            importlib.import_module(name)
            return
        except ImportError:
            continue
    raise ImportError(
        "logger=tensorboard needs the `tensorboard` package: `pip install tensorboard` "
        "(or choose logger=csv, logger=wandb or logger=none)"
    )


def finish_loggers(loggers: list[Logger]) -> None:
    """Close wandb runs so that the next job of a multirun starts a new one."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()
