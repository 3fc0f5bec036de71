"""`lightning-qlora-train` end to end: real entry points, real subprocesses, a few steps on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_run import cli_env, run_cli

import lightning_qlora

# Small and quick, but through every stage: validate, fit, validate, export, summary.
FAST = [
    "data.batch_size=4",
    "data.max_length=24",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


def _console_script() -> str:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("lightning-qlora-train", path=search)
    if script is None:
        pytest.skip("the lightning-qlora-train console script is not installed")
    return script


def _check_run_folder(run_dir: Path, r: int, metric: str) -> dict:
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == r
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"]["name"] == metric
    assert isinstance(summary["metric"]["untuned"], float)
    assert isinstance(summary["metric"]["tuned"], float)
    assert summary["train"]["tokens"] > 0
    assert summary["train"]["tokens_per_sec"] > 0
    assert summary["memory"]["peak_rss_mib"] > 100
    assert summary["adapter_dir"] == str(run_dir / "adapter")
    return summary


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path: Path) -> None:
    """The default (MiniLM sentiment, NF4 + DQ) for two steps, via `python -m lightning_qlora.cli.train`."""
    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _check_run_folder(run_dir, r=8, metric="val/acc")
    assert summary["train"]["steps"] == 2
    assert summary["compute_dtype"] in ("bfloat16", "float32")
    assert summary["quantization"]["quantized_layers"] == 36  # MiniLM's pooler (unused) is dropped
    assert summary["choices"]["experiment"] == "sentiment_qlora"
    assert summary["version"] == lightning_qlora.__version__
    assert summary["interrupted"] is False
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert (run_dir / "train.log").is_file()
    assert "val/acc: untuned" in proc.stdout
    assert not (tmp_path / "runs").exists()
    # the loggers get the whole config, the version and the quantization report
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["lora.r"] == 8
    assert hparams["optimizer.lr"] == 3e-3
    assert hparams["trainer.max_epochs"] == 1
    assert hparams["lightning_qlora_version"] == lightning_qlora.__version__
    assert hparams["quantization.quantized_layers"] == 36
    # one quantization table, a picture of the run, and no missing-metric warning although the run is
    # shorter than an epoch (it validates at its last step, and the best checkpoint is written)
    assert (proc.stdout + proc.stderr).count("bits per quantized parameter") == 1
    assert summary["curves"] == str(run_dir / "curves.png")
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "could not find the monitored key" not in proc.stderr
    assert summary["checkpoint"] is not None and Path(summary["checkpoint"]).is_file()


@pytest.mark.slow
def test_console_script_multirun(tmp_path: Path) -> None:
    """`lightning-qlora-train -m lora.r=4,8` on the tiny causal LM: one run folder per value."""
    sweep = tmp_path / "sweep"
    args = [
        "-m", "experiment=smoke_tiny_llama", "lora.r=4,8", "trainer.max_steps=1", "logger=none",
        "model.num_samples_to_generate=1", "model.max_new_tokens=4", *FAST, f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = subprocess.run(
        [_console_script(), *args], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {}
    for job, r in (("0_lora.r=4", 4), ("1_lora.r=8", 8)):  # job folders named by their overrides
        summary = _check_run_folder(sweep / job, r=r, metric="val/loss")
        assert summary["log_dir"] is None
        assert f"lora.r={r}" in summary["overrides"]
        summaries[job] = summary
    assert (sweep / "multirun.yaml").is_file()
    # the sweep table: every job, its overrides and final metrics, best (lowest val/loss) first
    rows = json.loads((sweep / "sweep.json").read_text())["jobs"]
    best_first = sorted(summaries, key=lambda job: summaries[job]["metric"]["tuned"])
    assert [row["job"] for row in rows] == best_first
    for row in rows:
        assert row["tuned"] == summaries[row["job"]]["metric"]["tuned"]
        assert "lora.r=" + row["job"][-1] in row["overrides"]
        assert row["status"] == "done"
    table = (sweep / "sweep.md").read_text()
    assert "| rank | overrides | val/loss (tuned) |" in table
    assert table.index(best_first[0].split("_")[1]) < table.index(best_first[1].split("_")[1])
    assert "==== sweep: 2 jobs, best first ====" in proc.stdout
    # each job printed what it trains on before its model loaded
    output = proc.stdout + proc.stderr
    assert output.count("(alpaca), max_length 24, packing off") == 2
    assert "real tokens in padded training batches" in output


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    proc = run_cli(["--cfg", "job", "lora.r=16", "precision=fp4"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "r: 16" in proc.stdout
    assert "quant_type: fp4" in proc.stdout
    assert "_target_: lightning_qlora.LoRA" in proc.stdout
    assert not any(tmp_path.iterdir())  # printing runs no job


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.rr=8", ["lora.rr", "+lora.rr=8"]),
        ("trainer.max_stepz=3", ["trainer.max_stepz"]),
        ("lora.r=abc", ["lora.r", "abc"]),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, override: str, expected: list[str]) -> None:
    proc = run_cli([override], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # rejected before any job started


@pytest.mark.slow
def test_missing_pretrained_path_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    proc = run_cli([f"model.pretrained_path={missing}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if str(missing) in line]
    assert len(lines) == 1
    assert lines[0].startswith("Error in config node model: FileNotFoundError")
    assert "Traceback" not in proc.stderr
