"""A diverged run stops with an error naming the step and never overwrites a good export or checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TinyClassifier, toy_loader

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora.lora.guard import DivergenceError, NonFiniteGuard


def poisoned_loader(
    bad_batches: tuple[int, ...], n: int = 96, batch_size: int = 16
) -> torch.utils.data.DataLoader:
    """The toy task with NaN inputs in the given batches."""
    loader = toy_loader(n=n, batch_size=batch_size)
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    x = x.clone()
    for b in bad_batches:
        x[b * batch_size, 0] = float("nan")
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(tmp_path: Path, loader: torch.utils.data.DataLoader, lora: LoRA, steps: int, lr: float = 1e-2,
        checkpoint: ModelCheckpoint | None = None) -> TinyClassifier:  # fmt: skip
    torch.manual_seed(0)
    module = TinyClassifier(lr=lr)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[QLoRAPrecision(compute_dtype="float32")],
        callbacks=[lora, *([checkpoint] if checkpoint else [])],
        enable_checkpointing=checkpoint is not None,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_nan_inputs_stop_training_naming_the_step_and_keep_the_good_export(tmp_path: Path) -> None:
    export = tmp_path / "adapter"
    fit(tmp_path, toy_loader(), LoRA(r=4, export_dir=export), steps=3)
    good = digest(export)
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(DivergenceError, match=r"optimizer step 3 .*the loss is nan") as info:
        fit(tmp_path, poisoned_loader((2,)), LoRA(r=4, export_dir=export), 5, checkpoint=checkpoint)
    assert "max_skipped_steps=0" in str(info.value)
    assert digest(export) == good  # the earlier good export is byte-identical
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]


def test_bad_steps_can_be_skipped_up_to_the_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lora = LoRA(r=4, max_skipped_steps=2, export_dir=tmp_path / "adapter")
    module = fit(tmp_path, poisoned_loader((1, 3)), lora, steps=6)
    assert lora.guard.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(DivergenceError, match=r"optimizer step 5 .*after skipping 2 step"):
        fit(tmp_path, poisoned_loader((1, 3, 4)), LoRA(r=4, max_skipped_steps=2), steps=6)


class Overflowing(TinyClassifier):
    """Finite loss and gradients, but an SGD step so large that the weights overflow to inf."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 1e30

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e20)


def test_an_overflowing_update_stops_training_before_any_export(tmp_path: Path) -> None:
    export = tmp_path / "adapter"
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[LoRA(r=4, export_dir=export)],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(DivergenceError, match=r"after optimizer step 1 .*trained weight"):
        trainer.fit(Overflowing(), toy_loader())
    assert not export.exists()


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_max_skipped_steps_is_checked(value: object) -> None:
    with pytest.raises(ValueError, match="max_skipped_steps"):
        NonFiniteGuard(value)  # type: ignore[arg-type]


class ScaledOverflow(TinyClassifier):
    """A finite loss whose scaled gradients overflow on the first step only (the scale then halves)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        w = next(p for p in self.parameters() if p.requires_grad)
        spike = w.sum() * 1e34  # same value added and taken away: only the gradient is huge
        return loss + spike - spike.detach()


def test_overflows_under_fp16_loss_scaling_are_left_to_the_grad_scaler(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    module = ScaledOverflow()
    pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[LoRA(r=4)],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, toy_loader())
    assert scaler.get_scale() < 2.0**16  # the scaler saw the overflow and skipped that step itself
    assert all(torch.isfinite(p).all() for p in module.parameters())
