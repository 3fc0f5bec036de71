"""Through the real command: a diverged run exits non-zero and leaves the earlier good export as it was."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_run import run_cli
from omegaconf import DictConfig

TINY = [
    "experiment=smoke_tiny_llama",
    "logger=none",
    "model.num_samples_to_generate=1",
    "model.max_new_tokens=4",
    "data.batch_size=4",
    "data.max_length=24",
    "trainer.limit_val_batches=1",
    "validate_before=false",
]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_a_diverging_run_exits_non_zero_and_keeps_the_good_export(tmp_path: Path) -> None:
    export = tmp_path / "adapter"
    good = run_cli(
        [*TINY, "trainer.max_steps=2", f"lora.export_dir={export}", f"hydra.run.dir={tmp_path / 'a'}"],
        tmp_path,
    )
    assert good.returncode == 0, good.stderr[-3000:]
    before = digest(export)
    # lr 1e30 with a constant schedule: the first step blows the adapters up, the second loss is NaN.
    diverging = [
        *TINY, "trainer.max_steps=4", "optimizer.lr=1e30", "optimizer.scheduler=constant",
        "optimizer.warmup_ratio=null", f"lora.export_dir={export}", f"hydra.run.dir={tmp_path / 'b'}",
    ]  # fmt: skip
    bad = run_cli(diverging, tmp_path)
    assert bad.returncode != 0
    assert "DivergenceError: Training diverged at optimizer step 2" in bad.stderr
    assert digest(export) == before
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["adapter_dir"] is None  # the export there is the earlier run's, not this one's
    assert not list(tmp_path.glob(".adapter.*"))  # no leftover temporary folder next to it


def test_max_skipped_steps_is_a_lora_setting(compose_train: Callable[..., DictConfig]) -> None:
    from hydra.utils import instantiate

    assert instantiate(compose_train().lora).guard.max_skipped_steps == 0  # off by default
    assert instantiate(compose_train("lora.max_skipped_steps=3").lora).guard.max_skipped_steps == 3
