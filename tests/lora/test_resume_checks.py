"""Adapter-only checkpoints resume only onto the base and the precision setup they were trained with."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TinyClassifier, toy_loader

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora.lora.resume_checks import ResumeMismatchError


def fit(
    tmp_path: Path,
    steps: int,
    seed: int,
    qlora: bool = True,
    ckpt_path: Path | None = None,
    **lora: object,
) -> Path:
    torch.manual_seed(seed)  # the base model's weights
    module = TinyClassifier()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[QLoRAPrecision(compute_dtype="float32")] if qlora else [],
        callbacks=[LoRA(r=4, dropout=0.0, **lora), saver],  # type: ignore[arg-type]
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, toy_loader(), ckpt_path=ckpt_path)
    return Path(saver.last_model_path or saver.best_model_path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(tmp_path_factory.mktemp("first"), steps=2, seed=0)


def test_resume_onto_the_same_base_works(tmp_path: Path, checkpoint: Path) -> None:
    fit(tmp_path, steps=4, seed=0, ckpt_path=checkpoint)


def test_resume_onto_other_base_weights_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(ResumeMismatchError, match="other base weights than this model's"):
        fit(tmp_path, steps=4, seed=1, ckpt_path=checkpoint)


def test_resume_without_the_plugin_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(
        ResumeMismatchError, match=r"precision \{'plugin': 'QLoRAPrecision'.*QLoRAPrecision\(\)"
    ):
        fit(tmp_path, steps=4, seed=0, qlora=False, ckpt_path=checkpoint)


def test_resume_with_other_target_modules_says_so(tmp_path: Path, checkpoint: Path) -> None:
    """Not "other base weights": adapting other layers changes which weights are frozen, too. The setting
    that differs is named before any weight is compared."""
    with pytest.raises(ValueError, match=r"exclude: checkpoint \('lm_head',\) vs now \('net.2',\)") as info:
        fit(tmp_path, steps=4, seed=0, ckpt_path=checkpoint, exclude=("net.2",))
    assert "base weights" not in str(info.value)


def test_a_checkpoint_carrying_the_base_is_refused(tmp_path: Path) -> None:
    full = fit(tmp_path / "full", steps=2, seed=0, qlora=False, adapter_only_checkpoints=False)
    with pytest.raises(
        KeyError, match=r"carries \d+ weight\(s\) of the frozen base, e\.g\. .*would overwrite"
    ):
        fit(tmp_path / "resumed", steps=4, seed=0, qlora=False, ckpt_path=full)
    as_full = {"qlora": False, "ckpt_path": full, "adapter_only_checkpoints": False}
    fit(tmp_path / "as-full", steps=4, seed=0, **as_full)  # type: ignore[arg-type]  # allowed
