"""`lightning-qlora-train` (or `python -m lightning_qlora.cli.train`): QLoRA fine-tuning from a Hydra config.

    lightning-qlora-train                                  # MiniLM sentiment, NF4 + DQ, a few CPU minutes
    lightning-qlora-train lora.r=16 precision=nf4 trainer.max_steps=100
    lightning-qlora-train experiment=smollm2_instruct      # SmolLM2-135M-Instruct, exact match before/after
    lightning-qlora-train experiment=smoke_tiny_llama logger=wandb   # pipeline smoke test
    lightning-qlora-train -m lora.r=8,64                   # one run per value
    lightning-qlora-train --cfg job                        # print the composed config and exit
    lightning-qlora-train --version

The job validates once before training (the untuned metric), fits, validates again, then prints a summary
and writes it as `summary.json` (and `curves.png`) to the run folder. It returns the tuned metric, for
Hydra's sweepers. Ctrl-C during training stops after the step, keeps the adapters and a checkpoint and
prints the command that resumes (`ckpt_path=...`); a second Ctrl-C exits at once.

Only Hydra and OmegaConf are imported until a job runs, so `--help`, `--version` and `--cfg` answer at once.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

if TYPE_CHECKING:
    from lightning_qlora.cli.job import JobParts, SetupError

SETUP_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a run stopped by Ctrl-C
_UNUSED_PARAMETERS = "took no part in the loss"
# Libraries that log through their own handler when imported before Hydra configured logging.
_LIBRARY_LOGGERS = ("lightning_qlora", "lightning", "lightning.pytorch", "lightning.fabric")


def main() -> float | None:
    """Console entry point. `--version` and `--help` are answered here: Hydra's own `--version` prints
    Hydra's version, and its `--help` takes seconds."""
    args = sys.argv[1:]
    if "--version" in args:
        from lightning_qlora import __version__

        print(f"lightning-qlora {__version__}")
        return None
    from lightning_qlora.cli.help import print_help, wants_help

    if wants_help(args):  # Hydra's --help takes seconds to scan the groups
        print_help(args)
        return None
    from lightning_qlora.cli import conf_dir  # registers the typed schema

    entry = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(hydra_main)
    return entry()  # Hydra composes cfg and passes it


class JobConfigError(Exception):
    """A job refused for its config: `line` is the one line printed, `exit_code` the command's status."""

    def __init__(self, line: str, exit_code: int = SETUP_ERROR_EXIT_CODE) -> None:
        super().__init__(line)
        self.line = line
        self.exit_code = exit_code


def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point: Hydra composes and checks the config; the job is built, trained and summarized.

    In a sweep a failing job is recorded (`failure.json` in its folder, shown in the sweep table) and the
    next job runs; the command exits non-zero once the sweep ends. A single run fails as it always did.
    """
    sweeping = _in_multirun()
    try:
        return _job(cfg)
    except JobConfigError as err:
        print(err.line, file=sys.stderr)
        print("(Set HYDRA_FULL_ERROR=1 for the traceback.)", file=sys.stderr, flush=True)
        if not sweeping:
            sys.exit(err.exit_code)
        _record_failure(cfg, err.line)
    except Exception as err:
        if not sweeping:
            raise
        import traceback

        print(f"Error executing job {Path(cfg.paths.output_dir).name}:", file=sys.stderr)
        traceback.print_exc()
        _record_failure(cfg, _last_line(err))
    return None


def _job(cfg: DictConfig) -> float | None:
    from lightning.pytorch import seed_everything

    from lightning_qlora.cli.job import SetupError, build, run_config_errors

    route_library_logs()
    start = time.perf_counter()
    seed_everything(cfg.seed, workers=True)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # then Hydra prints the whole traceback
    try:
        parts = build(cfg)
    except SetupError as err:
        if full_error:
            raise
        raise _config_error(err) from err
    config_errors = run_config_errors()
    try:
        with parts.interrupt.installed():
            tuned = run(cfg, parts, start)
    except tuple(config_errors) as err:
        if full_error:
            raise
        node = next(n for cls, n in config_errors.items() if isinstance(err, cls))
        raise _config_error(SetupError(node, err)) from err
    except RuntimeError as err:
        if full_error or _UNUSED_PARAMETERS not in str(err):
            raise
        raise _unused_parameters_error() from err
    if parts.interrupt.requested:
        _end_sweep_early()
        sys.exit(INTERRUPTED_EXIT_CODE)
    return tuned


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _last_line(err: BaseException) -> str:
    """The error's type and the last non-empty line of its message, as a traceback ends."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def _record_failure(cfg: DictConfig, error: str) -> None:
    from hydra.core.hydra_config import HydraConfig

    from lightning_qlora.cli.sweep import record_failed_job

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record_failed_job(cfg.paths.output_dir, overrides, error)


def _config_error(err: SetupError) -> JobConfigError:
    """One line naming the config node and the cause, and a non-zero exit."""
    return JobConfigError(f"Error in config node {err}")


def _unused_parameters_error() -> JobConfigError:
    """DDP found adapters outside the loss: say which overrides fix it, in one line."""
    return JobConfigError(
        "Error in config node trainer.strategy: under DDP some trainable parameters took no part in the "
        "loss. If that is intended, add `trainer.strategy.find_unused_parameters=true`; otherwise keep "
        "those modules out of LoRA with `lora.exclude=[...]` (the module names are in the traceback: set "
        "HYDRA_FULL_ERROR=1)."
    )


def _end_sweep_early() -> None:
    """Ctrl-C in a multirun stops the sweep too; the table still lists the jobs that ran."""
    from hydra.core.hydra_config import HydraConfig

    if _in_multirun():
        from lightning_qlora.cli.sweep import write_sweep_table

        write_sweep_table(HydraConfig.get().sweep.dir)


def run(cfg: DictConfig, parts: JobParts, start: float) -> float | None:
    """Validate (untuned), fit, validate (tuned), summarize; returns the tuned metric.

    After Ctrl-C (fit stopped early) the tuned validation is skipped and the summary says how to resume;
    after an error in training, the summary records the error and what was saved, then the error goes on.
    """
    from lightning_qlora.cli.job import finish_loggers
    from lightning_qlora.cli.summary import metrics_dict

    trainer, model, datamodule = parts.trainer, parts.model, parts.datamodule
    before: dict[str, Any] = {}
    if cfg.validate_before:
        before = metrics_dict(trainer.validate(model, datamodule=datamodule, verbose=False)[0])
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except BaseException:
        if parts.interrupt.error is not None:  # the error came from training: keep what was saved
            train_metrics = metrics_dict(
                {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train")}
            )
            after = metrics_dict(parts.fit_validation.metrics)
            summarize(cfg, parts, before, after, train_metrics, time.perf_counter() - start)
        raise
    # read before another validation resets them
    train_metrics = metrics_dict({k: v for k, v in trainer.callback_metrics.items() if k.startswith("train")})
    after = metrics_dict(parts.fit_validation.metrics)
    if (
        cfg.validate_after
        and not parts.interrupt.requested
        and parts.fit_validation.step != trainer.global_step
    ):
        after = metrics_dict(trainer.validate(model, datamodule=datamodule, verbose=False)[0])
    summary = summarize(cfg, parts, before, after, train_metrics, time.perf_counter() - start)
    finish_loggers(parts.loggers)
    tuned = summary["metric"]["tuned"]
    return float(tuned) if isinstance(tuned, (int, float)) else None


def summarize(
    cfg: DictConfig,
    parts: JobParts,
    before: dict[str, Any],
    after: dict[str, Any],
    train_metrics: dict[str, Any],
    wall_time_s: float,
) -> dict[str, Any]:
    """Collect the summary; rank 0 prints it and writes `summary.json` to the run folder."""
    from hydra.core.hydra_config import HydraConfig

    from lightning_qlora import __version__
    from lightning_qlora.cli.interrupt import resume_command
    from lightning_qlora.cli.summary import (
        compare,
        format_summary,
        peak_memory,
        write_summary,
    )

    trainer, throughput, precision = parts.trainer, parts.throughput, parts.precision
    interrupt = parts.interrupt
    run_dir = Path(cfg.paths.output_dir)
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    adapter_dir = parts.lora.exported or interrupt.adapter_dir  # written by this run: never an earlier one
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    resume = None
    if interrupt.checkpoint is not None:
        checkpoint = str(interrupt.checkpoint)
        resume = resume_command(overrides, interrupt.checkpoint, run_dir.resolve())
    curves = _plot(cfg, parts) if trainer.is_global_zero else None
    report = getattr(precision, "report", None)
    compute_dtype = getattr(precision, "compute_dtype", None)
    log_dirs = [str(Path(d)) for d in map(_log_dir, parts.loggers) if d is not None]
    summary: dict[str, Any] = {
        "task_name": cfg.task_name,
        "version": __version__,
        "interrupted": interrupt.interrupted,
        "error": f"{type(interrupt.error).__name__}: {interrupt.error}" if interrupt.error else None,
        "run_dir": str(run_dir),
        "choices": dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {},
        "overrides": overrides,
        "metric": compare(cfg.metric.name, cfg.metric.mode, before, after),
        "validation": {"untuned": before, "tuned": after},
        "samples": _samples(parts.model),
        "train": {
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "final_metrics": train_metrics,
            # the last batch's loss is noisy; this is the mean over the last steps (at most 10)
            "loss_last_steps": _recent_train_loss(parts),
            "time_s": throughput.train_time_s if throughput else None,
            "tokens": throughput.tokens if throughput else None,
            "tokens_per_sec": throughput.tokens_per_sec if throughput else None,
            "global_tokens_per_sec": throughput.global_tokens_per_sec if throughput else None,
            "steps_per_sec": throughput.steps_per_sec if throughput else None,
            "world_size": trainer.world_size,
        },
        "trainable_params": sum(p.numel() for p in parts.model.parameters() if p.requires_grad),
        "compute_dtype": str(compute_dtype).removeprefix("torch.") if compute_dtype is not None else None,
        "quantization": report.as_dict() if report is not None else None,
        "memory": peak_memory(),
        "adapter_dir": str(adapter_dir) if adapter_dir is not None and adapter_dir.is_dir() else None,
        "log_dir": log_dirs[0] if log_dirs else None,
        "checkpoint": checkpoint,
        "resume_command": resume,
        "curves": str(curves) if curves is not None else None,
        "wall_time_s": wall_time_s,
        "summary_path": str(run_dir / "summary.json"),
    }
    if trainer.is_global_zero:
        write_summary(summary, run_dir)
        print("\n" + format_summary(summary), flush=True)
    return summary


def _samples(model: Any) -> dict[str, Any] | None:
    """Generated answers of the first (untuned) and last (tuned) validation, for modules that keep them."""
    history = getattr(model, "sample_history", None)
    if not isinstance(history, dict) or not history:
        return None
    first, last = min(history), max(history)
    return {"untuned": history[first] if first == 0 else None, "tuned": history[last] if last > 0 else None}


def _recent_train_loss(parts: JobParts, steps: int = 10) -> dict[str, Any] | None:
    """Mean training loss over the last `steps` optimizer steps (from the curve recorder)."""
    losses = [loss for _, loss in parts.curves.curves.train_loss[-steps:]] if parts.curves else []
    return {"mean": sum(losses) / len(losses), "steps": len(losses)} if losses else None


def _plot(cfg: DictConfig, parts: JobParts) -> Path | None:
    """`curves.png` in the run folder; a drawing problem is reported, never fatal to the run."""
    if parts.curves is None:
        return None
    from lightning_qlora.cli.curves import CURVES_NAME, plot_curves

    try:
        return plot_curves(
            parts.curves.curves, Path(cfg.paths.output_dir) / CURVES_NAME, cfg.task_name, cfg.metric.name
        )
    except Exception as err:  # e.g. matplotlib missing from a trimmed install
        logging.getLogger("lightning_qlora").warning("No curves.png: %s: %s", type(err).__name__, err)
        return None


def _log_dir(logger: Any) -> str | None:
    """CSV/TensorBoard loggers have a `log_dir`; wandb's files are under its `save_dir`."""
    return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)


def route_library_logs() -> None:
    """Send the package's and Lightning's messages through Hydra's handlers (console and `<job>.log`).

    Both install their own stream handler when imported before any logging configuration, which is the
    case here (the config schema is imported before Hydra starts), so their records would miss the file.
    """
    if not logging.getLogger().handlers:
        return  # Hydra's job logging is disabled: keep the libraries' own handlers
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


if __name__ == "__main__":
    main()
