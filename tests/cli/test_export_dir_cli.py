"""Through the real command: `lora.export_dir` never names a folder whose files the export would delete.

The working directory (`lora.export_dir=''`) and the run folder (`${paths.output_dir}`) are refused before
the model loads, and every file there is left as it was (the other cases: tests/lora/test_export_dir.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_run import run_cli

from lightning_qlora.cli.run_lock import LOCK_NAME

SMOKE = [
    "experiment=smoke_tiny_llama", "logger=none", "data.batch_size=4", "data.max_length=24",
    "trainer.max_steps=2", "trainer.limit_val_batches=1", "model.num_samples_to_generate=0",
]  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` but what each start of the command writes (`.hydra/`, the log, the lock)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if ".hydra" not in p.relative_to(root).parts and p.suffix != ".log" and p.name != LOCK_NAME
    }


def refusal_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error in config node")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("Error in config node lora.export_dir: ExportDirError: ")
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("''", "names the working directory"),
        ("${paths.output_dir}", "is the run folder; an export replaces the whole folder"),
    ],
    ids=["empty", "run-folder"],
)
def test_export_dir_that_would_delete_files_is_refused_before_the_model_loads(
    tmp_path: Path, value: str, reason: str
) -> None:
    project = tmp_path / "project"  # the working directory: a user's sources
    (project / "src").mkdir(parents=True)
    (project / "src" / "model.py").write_text("print('mine')\n")
    (project / "notes.txt").write_text("notes\n")
    run_dir = tmp_path / "runs" / "run"  # a run folder that already holds a checkpoint
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier checkpoint")
    before = snapshot(tmp_path)
    proc = run_cli([*SMOKE, f"lora.export_dir={value}", f"hydra.run.dir={run_dir}"], project)
    line = refusal_line(proc)
    assert reason in line and "Pass a" in line
    assert snapshot(tmp_path) == before  # nothing lost, nothing written (no adapter, no summary)
