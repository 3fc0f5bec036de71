"""Through the real command: a sweep survives a failing job, and a run folder takes one command at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import cli_env, run_cli

from lightning_qlora.cli.run_lock import LOCK_NAME, RunFolderBusyError, lock_run_folder, unlock_run_folder

SMOKE = [
    "experiment=smoke_tiny_llama", "logger=none", "data.batch_size=4", "data.max_length=24",
    "trainer.max_steps=1", "trainer.limit_val_batches=1", "model.num_samples_to_generate=0",
]  # fmt: skip


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """`lora.r=0` fails while the job is built, `metric.name=nope` once training validates; the rest run."""
    sweep = tmp_path / "sweep"
    args = ["-m", *SMOKE, "lora.r=0,4", "metric.name=val/loss,nope", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 job(s) of the sweep failed" in proc.stderr
    rows = {row["job"]: row for row in json.loads((sweep / "sweep.json").read_text())["jobs"]}
    assert sorted(rows) == [
        "0_lora.r=0,metric.name=val_loss",
        "1_lora.r=0,metric.name=nope",
        "2_lora.r=4,metric.name=val_loss",
        "3_lora.r=4,metric.name=nope",
    ]
    done = rows.pop("2_lora.r=4,metric.name=val_loss")  # ran although two jobs before it failed
    assert done["status"] == "done" and isinstance(done["tuned"], float)
    assert (sweep / "2_lora.r=4,metric.name=val_loss" / "adapter" / "adapter_config.json").is_file()
    for job, row in rows.items():
        assert row["status"] == "failed"
        assert row["job_dir"] == str(sweep / job)
        assert "lora.r=" + job.split("lora.r=")[1][0] in row["overrides"]
        record = json.loads((sweep / job / "failure.json").read_text())
        assert record["error"] == row["error"] and record["overrides"] == row["overrides"]
    for job in ("0_lora.r=0,metric.name=val_loss", "1_lora.r=0,metric.name=nope"):
        assert rows[job]["error"].startswith("Error in config node lora: ValueError: LoRA r must be")
    assert "nope" in rows["3_lora.r=4,metric.name=nope"]["error"]
    table = (sweep / "sweep.md").read_text()
    assert "Failed jobs (3):" in table
    assert (
        f"- `lora.r=0 metric.name=nope` ({sweep / '1_lora.r=0,metric.name=nope'}): Error in config node"
        in table
    )
    assert "==== sweep: 4 jobs, best first ====" in proc.stdout


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def test_a_second_command_into_a_run_folder_in_use_is_refused(tmp_path: Path) -> None:
    """The first command (here: this process, holding the folder's lock) loses nothing, `.hydra/` included."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("lora:\n  r: 8\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"the first command's checkpoint")
    lock_run_folder(run_dir)
    try:
        before = snapshot(tmp_path)
        proc = run_cli([*SMOKE, f"hydra.run.dir={run_dir}"], tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"Error: {run_dir} is in use by another lightning-qlora command (pid " in proc.stderr
        assert "Wait for it to end, or pass another folder (hydra.run.dir=" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert snapshot(tmp_path) == before
        assert (run_dir / LOCK_NAME).is_file()
    finally:
        unlock_run_folder(run_dir)


def test_a_run_folder_that_is_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "results.txt"
    taken.write_text("the user's results\n")
    for run_dir in (taken, taken / "run"):
        proc = run_cli([*SMOKE, f"hydra.run.dir={run_dir}"], tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert line.startswith(f"Error: hydra.run.dir={run_dir} cannot be the run folder (")
        assert "pass a folder this user can write" in line
    assert taken.read_text() == "the user's results\n"


def test_the_lock_of_a_killed_command_is_gone(tmp_path: Path) -> None:
    """The kernel drops a flock with its process: a run killed with -9 never blocks the folder."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = rf"in use by another lightning-qlora command \(pid {holder.pid}\)"
        with pytest.raises(RunFolderBusyError, match=busy):
            lock_run_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert lock_run_folder(tmp_path) == tmp_path.resolve() / LOCK_NAME
    unlock_run_folder(tmp_path)


HOLD = """
import sys, time
from lightning_qlora.cli.run_lock import lock_run_folder
lock_run_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""
