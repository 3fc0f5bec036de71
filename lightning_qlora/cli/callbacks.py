"""Small callbacks the training command always adds: the last fit validation, a validation at the last step
of a run shorter than an epoch, and the run's description (config, version, quantization) for the loggers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_qlora import __version__


class FitValidation(Callback):
    """Keep the metrics of the last validation inside `fit` and the step it ran at.

    When fit ended right after a validation (at the end of its last epoch, or at its last step, see
    `ValidateAtLastStep`), those are the tuned metrics and the job need not run the same validation again.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, Any] = {}

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.step = trainer.global_step
        self.metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}


class ValidateAtLastStep(Callback):
    """A run that stops at `max_steps` inside an epoch validates at that step.

    Lightning validates at the end of an epoch; a shorter run would end without the monitored metric, so
    `ModelCheckpoint` warns and saves nothing. Asking the loop to stop at the last step makes Lightning run
    the validation first (as it does for early stopping), and the job then reuses those metrics.
    """

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        max_steps = trainer.max_steps
        if max_steps is not None and 0 < max_steps <= trainer.global_step:
            trainer.should_stop = True


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"lora": {"r": 8}}` -> `{"lora.r": 8}`; lists stay values (loggers show them as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class RunDescription(Callback):
    """Give every logger the whole composed config (flattened), the package version and the quantization
    report, once per run; print the quantization table once (Lightning calls the precision plugin's setup
    for each `validate` and `fit`, and the plugin would print it each time).

    Args:
        config: the resolved job config (without Hydra's own node).
        precision: the precision plugin, read for its `report` once the model was converted.
        print_report: print the quantization table (the plugin's `log_report`, which the job turns off).
    """

    def __init__(self, config: Mapping[str, Any], precision: Any | None, print_report: bool) -> None:
        self.params: dict[str, Any] = {**flatten(config), "lightning_qlora_version": __version__}
        self.precision = precision
        self.print_report = print_report
        self.done = False

    def quantization(self) -> dict[str, Any]:
        report = getattr(self.precision, "report", None)
        return {} if report is None else {f"quantization.{k}": v for k, v in report.as_dict().items()}

    def _describe(self, trainer: pl.Trainer) -> None:
        if self.done:
            return
        self.done = True
        params = {**self.params, **self.quantization()}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        report = getattr(self.precision, "report", None)
        if self.print_report and report is not None:
            config = getattr(self.precision, "config", None)
            dtype = str(getattr(self.precision, "compute_dtype", None)).removeprefix("torch.")
            recipe = (
                f"{str(config.quant_type).upper()}{' + double quantization' if config.double_quant else ''}, "
                f"blocksize {config.blocksize}, "
                if config is not None
                else ""
            )
            rank_zero_info(f"QLoRAPrecision: {recipe}compute dtype {dtype}\n{report.table()}")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._describe(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._describe(trainer)
