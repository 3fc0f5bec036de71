"""Through the real command: mistakes that used to cost a whole run are one clear line before training.

`lora.export_module=nope` and an `export_dir` that is a file used to fail when fit ended, losing the
work; a model folder without tokenizer files trained on [UNK]s; a `precision.exclude` pattern that
matched nothing quantized the layer it meant to keep, without a word.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_run import run_cli

from lightning_qlora.tasks import default_pretrained_path

SMOKE = [
    "experiment=smoke_tiny_llama", "logger=none", "data.batch_size=4", "data.max_length=24",
    "trainer.max_steps=2", "trainer.limit_val_batches=1", "model.num_samples_to_generate=0",
]  # fmt: skip


def refusal(proc: subprocess.CompletedProcess[str], node: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error in config node")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"Error in config node {node}: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


def untrained(run_dir: Path) -> bool:
    return not list(run_dir.rglob("*.ckpt")) and not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_unknown_export_module_is_refused_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*SMOKE, "lora.export_module=nope", f"hydra.run.dir={run_dir}"], tmp_path)
    line = refusal(proc, "lora.export_module")
    assert "export_module='nope' is not a submodule of CausalLMInstructionModule" in line
    assert "'model'" in line
    assert untrained(run_dir)


@pytest.mark.slow
def test_export_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    run_dir, existing = tmp_path / "run", tmp_path / "adapter.bin"
    existing.write_bytes(b"something else")
    proc = run_cli([*SMOKE, f"lora.export_dir={existing}", f"hydra.run.dir={run_dir}"], tmp_path)
    line = refusal(proc, "lora.export_dir")
    assert "NotADirectoryError" in line and "is an existing file" in line
    assert existing.read_bytes() == b"something else"
    assert untrained(run_dir)


@pytest.mark.slow
def test_model_folder_without_tokenizer_files_is_refused_naming_them(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(default_pretrained_path() / name)
    run_dir = tmp_path / "run"
    proc = run_cli([f"model.pretrained_path={folder}", "logger=none", f"hydra.run.dir={run_dir}"], tmp_path)
    line = refusal(proc, "data")
    assert "has no tokenizer files: expected tokenizer.json or vocab.txt" in line
    assert "found ['config.json', 'model.safetensors']" in line
    assert untrained(run_dir)


@pytest.mark.slow
def test_precision_exclude_matching_nothing_is_refused_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*SMOKE, "precision.exclude=[lm_haed]", f"hydra.run.dir={run_dir}"], tmp_path)
    line = refusal(proc, "precision")
    assert "ExcludePatternError" in line and "['lm_haed'] match no linear layer" in line
    assert "Did you mean ['lm_head', 'model.lm_head']?" in line
    assert untrained(run_dir)
