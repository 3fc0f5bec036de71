"""Config values Lightning would accept, refused by the command before anything is built."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import DictConfig
from tiny_models import TinyClassifier, toy_loader

from lightning_qlora.cli.job import SetupError, build, check_ckpt_path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches must be a positive integer"),
        ("trainer.gradient_clip_val=-0.5", r"trainer.gradient_clip_val must be a finite number >= 0 or null"),
    ],
    ids=["accumulate-0", "negative-clip"],
)
def test_unusable_trainer_values_fail_in_the_trainer_node(
    compose_train: Callable[..., DictConfig], override: str, message: str
) -> None:
    cfg = compose_train("experiment=smoke_tiny_llama", "logger=none", override)
    with pytest.raises(SetupError, match=rf"^trainer: SettingTypeError: {message}"):
        build(cfg)


def _checkpoints(tmp_path: Path) -> dict[str, Path]:
    """A real Lightning checkpoint of a tiny module, and what goes wrong with such files."""
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(TinyClassifier(), toy_loader())
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    empty, truncated, weights = tmp_path / "empty.ckpt", tmp_path / "truncated.ckpt", tmp_path / "weights.pt"
    empty.write_bytes(b"")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save(TinyClassifier().state_dict(), weights)  # weights alone, as torch.save writes them
    return {"good": good, "empty": empty, "truncated": truncated, "weights": weights}


def test_an_unusable_ckpt_path_is_refused_before_the_model_loads(
    compose_train: Callable[..., DictConfig], tmp_path: Path
) -> None:
    files = _checkpoints(tmp_path)
    check_ckpt_path(str(files["good"]))  # a checkpoint Lightning wrote passes
    expected = {
        "empty": r"is empty \(0 bytes\)",
        "truncated": r"is not a checkpoint torch.save wrote \(no zip archive: truncated, or another format\)",
        "weights": r"has no 'state_dict': it is not a Lightning checkpoint",
    }
    for name, message in expected.items():
        cfg = compose_train("experiment=smoke_tiny_llama", "logger=none", f"ckpt_path={files[name]}")
        with pytest.raises(SetupError, match=rf"^ckpt_path: ValueError: ckpt_path={files[name]} {message}"):
            build(cfg)


def test_max_length_beyond_the_model_positions_is_refused_before_training(
    compose_train: Callable[..., DictConfig],
) -> None:
    cfg = compose_train("experiment=smoke_tiny_llama", "logger=none", "data.max_length=100000")
    with pytest.raises(
        SetupError, match=r"^data.max_length: ValueError: data.max_length=100000 is beyond the"
    ):
        build(cfg)
