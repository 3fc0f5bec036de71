"""What a training job reports at the end: metrics before and after, throughput, peak memory, outputs."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SUMMARY_NAME = "summary.json"


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process (MiB) and, on CUDA, the peak allocated by PyTorch (MiB)."""
    rss: float | None = None
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows: psutil's peak working set
        import psutil

        info = psutil.Process().memory_info()
        rss = getattr(info, "peak_wset", info.rss) / 2**20
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mib": rss, "cuda_max_allocated_mib": cuda}


def to_number(value: Any) -> Any:
    """Tensors and numpy scalars as plain floats, so the summary is JSON."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return value


def metrics_dict(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k): to_number(v) for k, v in sorted((metrics or {}).items())}


def compare(name: str, mode: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The main metric untuned vs tuned, and whether tuning improved it in the configured direction."""
    untuned, tuned = before.get(name), after.get(name)
    out: dict[str, Any] = {"name": name, "mode": mode, "untuned": untuned, "tuned": tuned}
    if isinstance(untuned, (int, float)) and isinstance(tuned, (int, float)):
        out["change"] = tuned - untuned
        out["improved"] = bool(tuned > untuned if mode == "max" else tuned < untuned)
    return out


def write_summary(summary: dict[str, Any], run_dir: Path) -> Path:
    path = run_dir / SUMMARY_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str, allow_nan=True) + "\n", encoding="utf-8")
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable block for the end of the console output."""
    metric = summary["metric"]
    lines = [f"==== lightning-qlora {summary.get('version', '')}: {summary['task_name']} ===="]
    change = metric.get("change")
    arrow = f" ({'+' if change >= 0 else ''}{change:.4f})" if isinstance(change, float) else ""
    lines.append(
        f"{metric['name']}: untuned {_fmt(metric['untuned'])} -> tuned {_fmt(metric['tuned'])}{arrow}"
    )
    for key, value in summary["validation"]["tuned"].items():
        if key != metric["name"]:
            lines.append(
                f"  {key}: untuned {_fmt(summary['validation']['untuned'].get(key))} -> {_fmt(value)}"
            )
    train = summary["train"]
    recent = train.get("loss_last_steps")
    for key, value in train["final_metrics"].items():
        if "tokens" in key:  # the token counters are summarized below
            continue
        if key == "train/loss" and recent:
            lines.append(f"train/loss: {_fmt(recent['mean'])} (mean of the last {recent['steps']} steps)")
        else:
            lines.append(f"last step {key}: {_fmt(value)}")
    rate = train["tokens_per_sec"]
    lines.append(
        f"training: {train['steps']} steps in {_fmt(train['time_s'], 1)} s"
        + (f", {rate:,.0f} tokens/s over the run ({train['tokens']:,} tokens)" if rate is not None else "")
        + f"; whole job {_fmt(summary['wall_time_s'], 1)} s"
    )
    memory = summary["memory"]
    mem = f"peak memory: {_fmt(memory['peak_rss_mib'], 0)} MiB RSS"
    if memory["cuda_max_allocated_mib"] is not None:
        mem += f", {_fmt(memory['cuda_max_allocated_mib'], 0)} MiB CUDA (max allocated)"
    lines.append(mem)
    if summary.get("compute_dtype"):
        lines.append(f"4-bit base: compute dtype {summary['compute_dtype']}")
    if summary.get("interrupted"):
        lines.append(f"INTERRUPTED{': ' + summary['error'] if summary.get('error') else ''}")
    lines.append(f"adapter: {summary['adapter_dir'] or '-'}")
    if summary.get("checkpoint"):
        lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary.get("curves"):
        lines.append(f"curves: {summary['curves']}")
    lines.append(f"logs: {summary['log_dir'] or '-'}")
    lines.append(f"summary: {summary['summary_path']}")
    if summary.get("resume_command"):
        lines.append(f"resume with: {summary['resume_command']}")
    return "\n".join(lines)
