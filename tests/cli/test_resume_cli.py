"""Through the real command: a run killed with SIGKILL resumes from its mid-epoch checkpoint
(`ckpt_path=...`) into exactly the steps of an uninterrupted run: same batches, the same losses bit for
bit, across the next epoch boundary too."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from cli_run import run_cli

WORDS = "the cat sat on a mat while dogs ran far away from home in rain and sun".split()  # noqa: SIM905


def write_records(folder: Path, n_train: int = 24) -> Path:
    """Instruction records of varied lengths (6 batches of 4 an epoch), so length grouping matters."""
    folder.mkdir(parents=True)
    for split, count in (("train", n_train), ("validation", 4)):
        lines = []
        for i in range(count):
            text = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + (i * 7) % 11))
            lines.append(json.dumps({"instruction": text, "input": "", "output": f"{text} {i}"}) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(lines))
    return folder


def steps(path: Path) -> dict[int, tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: (r["batch"], r["loss"]) for r in rows}


@pytest.mark.slow
def test_kill_9_then_resume_from_the_command_line_repeats_the_uninterrupted_steps(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data")
    common = [
        "experiment=smoke_tiny_llama", "logger=none", "validate_before=false", f"data.data_dir={data}",
        "data.batch_size=4", "data.max_length=32", "trainer.max_steps=14", "trainer.limit_val_batches=1",
        "model.num_samples_to_generate=1", "model.max_new_tokens=2", "lora.dropout=0.2",
    ]  # fmt: skip

    def job(name: str, *extra: str) -> tuple[list[str], Path]:
        probe = tmp_path / f"{name}.jsonl"
        every_4 = (
            "+callbacks.every={_target_:lightning.pytorch.callbacks.ModelCheckpoint,"
            f"dirpath:{tmp_path / name / 'every'},every_n_train_steps:4,save_top_k:-1}}"
        )
        args = [*common, every_4, f"hydra.run.dir={tmp_path / name}", *extra]
        return [*args, f"+callbacks.probe={{_target_:resume_probe.StepProbe,path:{probe}}}"], probe

    args, reference_probe = job("reference")
    reference = run_cli(args, tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = steps(reference_probe)
    assert sorted(expected) == list(range(1, 15))

    args, killed_probe = job("killed")
    args[-1] = args[-1].replace("}", ",kill_before:9}")
    killed = run_cli(args, tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert steps(killed_probe) == {s: expected[s] for s in range(1, 9)}
    checkpoint = tmp_path / "killed" / "every" / "epoch=1-step=8.ckpt"  # 6 steps an epoch: mid-epoch
    assert checkpoint.is_file()

    args, resumed_probe = job("resumed", f"ckpt_path='{checkpoint}'")
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "cannot restore" not in resumed.stderr + resumed.stdout
    got = steps(resumed_probe)
    assert sorted(got) == list(range(9, 15))
    for step, (batch, loss) in got.items():
        assert batch == expected[step][0], f"step {step}: another batch than the uninterrupted run's"
        assert loss == expected[step][1], (
            f"step {step}: loss {float.fromhex(loss)} != {float.fromhex(expected[step][1])}"
        )
