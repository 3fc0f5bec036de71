"""The table at the end of a multirun: each job's overrides and final metrics, best first.

`SweepTable` is a Hydra callback (registered in `conf/train.yaml` under `hydra.callbacks`). When the sweep
ends it reads every job folder's `summary.json` and `failure.json` (written by a job that failed: its
overrides, the error's last line, its folder), writes `sweep.md` and `sweep.json` into the sweep folder,
prints the Markdown table and, if a job failed, ends the command with a non-zero status. A failing job does
not stop the sweep: the training command records it and the remaining jobs run.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SWEEP_MARKDOWN = "sweep.md"
SWEEP_JSON = "sweep.json"
FAILURE_JSON = "failure.json"
FAILED_SWEEP_EXIT_CODE = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
_MAX_DIRNAME = 120


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def sweep_keys(argv: Sequence[str]) -> set[str]:
    """The keys a command line sweeps over (`lora.r=4,8`, `x=range(1,3)`), by Hydra's override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys: set[str] = set()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # Hydra reports bad overrides itself
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def job_dirname(num: int, overrides: Sequence[str], argv: Sequence[str] | None = None) -> str:
    """`1_lora.r=8,optimizer.lr=0.001`: the job number (unique, sorts in launch order) and the values of
    the swept keys (all overrides when none is found, e.g. with a sweeper plugin), with path separators
    and other odd characters replaced, cut to a length every file system accepts."""
    keys = sweep_keys(sys.argv[1:] if argv is None else argv)
    chosen = [str(o) for o in overrides if _key(str(o)) in keys] or [str(o) for o in overrides]
    clean = _UNSAFE.sub("_", ",".join(chosen)).strip("_")[:_MAX_DIRNAME]
    return f"{num}_{clean}" if clean else str(num)


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    loaded = OmegaConf.to_container(OmegaConf.load(path))
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def record_failed_job(job_dir: str | Path, overrides: Sequence[str], error: str) -> Path:
    """Write `failure.json` into the job's folder: what the sweep table shows for a job that failed."""
    from lightning_qlora._atomic import atomic_write_text

    job_dir = Path(job_dir)
    record = {"overrides": [str(o) for o in overrides], "error": error, "job_dir": str(job_dir)}
    return atomic_write_text(job_dir / FAILURE_JSON, json.dumps(record, indent=2) + "\n")


def _failure(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / FAILURE_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder (a folder with `.hydra/` or `summary.json`), best tuned metric first."""
    rows: list[dict[str, Any]] = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        summary_path = job_dir / "summary.json"
        if not summary_path.is_file() and not (job_dir / ".hydra").is_dir():
            continue
        row: dict[str, Any] = {"job": job_dir.name, "overrides": _job_overrides(job_dir)}
        failure = _failure(job_dir)
        if failure is not None or not summary_path.is_file():
            error = (failure or {}).get("error") or "no summary.json (killed?)"
            rows.append({**row, "status": "failed", "error": error, "job_dir": str(job_dir)})
            continue
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        metric, train = summary.get("metric", {}), summary.get("train", {})
        row.update(
            status="interrupted" if summary.get("interrupted") else "done",
            metric=metric.get("name"),
            mode=metric.get("mode"),
            tuned=metric.get("tuned"),
            untuned=metric.get("untuned"),
            validation=summary.get("validation", {}).get("tuned", {}),
            train_loss=train.get("final_metrics", {}).get("train/loss"),
            steps=train.get("steps"),
            tokens_per_sec=train.get("tokens_per_sec"),
            peak_rss_mib=summary.get("memory", {}).get("peak_rss_mib"),
            adapter_dir=summary.get("adapter_dir"),
        )
        rows.append(row)

    def key(row: dict[str, Any]) -> tuple[int, float]:
        tuned = _finite(row.get("tuned"))
        if tuned is None:
            return (1, 0.0)
        return (0, -tuned if row.get("mode", "max") == "max" else tuned)

    return sorted(rows, key=key)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def varying(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Each row's overrides whose value differs between jobs (what the sweep changed); all when none do."""
    per_row = [{_key(o): o for o in row["overrides"]} for row in rows]
    keys = {k for overrides in per_row for k in overrides}
    changed = {k for k in keys if len({overrides.get(k) for overrides in per_row}) > 1}
    return [[o for o in row["overrides"] if not changed or _key(o) in changed] for row in rows]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rank, what the sweep changed, the metric tuned and untuned, the last train loss, steps, speed."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    header = [
        "rank",
        "overrides",
        f"{metric} (tuned)",
        "untuned",
        "train/loss",
        "steps",
        "tokens/s",
        "status",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, (row, changed) in enumerate(zip(rows, varying(rows), strict=True), start=1):
        cells = [
            rank,
            " ".join(changed) or "(defaults)",
            row.get("tuned"),
            row.get("untuned"),
            row.get("train_loss"),
            row.get("steps"),
            round(row["tokens_per_sec"]) if isinstance(row.get("tokens_per_sec"), float) else None,
            row["status"],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def write_sweep_table(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """Write `sweep.md` and `sweep.json` into the sweep folder; None when it holds no job."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    rows = collect_rows(sweep_dir)
    if not rows:
        return None
    table = markdown_table(rows) + failures_section(rows)
    md_path, json_path = sweep_dir / SWEEP_MARKDOWN, sweep_dir / SWEEP_JSON
    md_path.write_text(f"# Sweep: {sweep_dir.name}\n\nBest first.\n\n{table}\n", encoding="utf-8")
    json_path.write_text(json.dumps({"jobs": rows}, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\n==== sweep: {len(rows)} jobs, best first ====\n{table}\ntable: {md_path}", flush=True)
    return md_path, json_path


def failures_section(rows: list[dict[str, Any]]) -> str:
    """Below the table: each failed job's overrides, folder and the last line of its error."""
    failed = [
        (row, changed) for row, changed in zip(rows, varying(rows), strict=True) if row["status"] == "failed"
    ]
    if not failed:
        return ""
    lines = ["", "", f"Failed jobs ({len(failed)}):", ""]
    for row, changed in failed:
        lines.append(f"- `{' '.join(changed) or '(defaults)'}` ({row['job_dir']}): {row['error']}")
    return "\n".join(lines)


class SweepTable(Callback):
    """Hydra callback: the sweep's table when a multirun ends; a non-zero exit if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if write_sweep_table(sweep_dir) is None:
            return
        failed = [row["job"] for row in collect_rows(sweep_dir) if row["status"] == "failed"]
        if failed:
            print(f"{len(failed)} job(s) of the sweep failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(FAILED_SWEEP_EXIT_CODE)
