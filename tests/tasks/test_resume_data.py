"""Exact resume from Python: the packaged data modules continue where a checkpoint was written.

A real Trainer, the LoRA callback (adapter dropout draws from the RNG it restores) and the real data
modules on small jsonl folders. Every checkpoint kind a run can write is resumed: mid-epoch
(``every_n_train_steps``), by the train-epoch-end hook (``save_on_train_epoch_end``) and after the
end-of-epoch validation. After the resume, each step must see the batch of the uninterrupted run and give
its loss bit for bit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_qlora import LoRA
from lightning_qlora.resumable import EpochRandomSampler, ResumableDataLoader
from lightning_qlora.tasks import InstructionDataModule, LengthGroupedBatchSampler, SentimentDataModule

WORDS = "the cat sat on a mat while dogs ran far away from home in rain and sun".split()  # noqa: SIM905


def write_data(folder: Path, kind: str, n: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for split, count in (("train", n), ("validation", 2)):
        for i in range(count):
            text = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(2 + (i * 7) % 9))
            if kind == "instruction":
                rows[split].append({"instruction": text, "output": f"{text} {i}"})
            else:
                rows[split].append({"text": text, "label": i % 2})
    for split, records in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def datamodule(kind: str, data_dir: Path) -> pl.LightningDataModule:
    if kind == "instruction":
        return InstructionDataModule(data_dir=str(data_dir), batch_size=2, max_length=24, seed=5)
    return SentimentDataModule(data_dir=str(data_dir), batch_size=2, max_length=24, seed=5)


class BagOfTokens(pl.LightningModule):
    """Small and fast: embeddings, dropout and a linear layer that LoRA adapts (with its own dropout)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.EmbeddingBag(30522, 16)
        self.dropout = nn.Dropout(0.2)
        self.proj = nn.Linear(16, 8)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hidden = self.embed(batch["input_ids"] * batch["attention_mask"])  # one bag per row
        return self.proj(self.dropout(hidden)).pow(2).mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_step(batch, batch_idx)
        self.log("val/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)


class Record(Callback):
    """Per optimizer step: the batch (its input ids) and the loss, exactly."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple[list[list[int]], float]] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps[trainer.global_step] = (batch["input_ids"].tolist(), float(outputs["loss"]))


def fit(
    kind: str, data_dir: Path, root: Path, max_steps: int, ckpt: Path | None = None
) -> tuple[Record, pl.Trainer]:
    record = Record()
    callbacks = [
        LoRA(r=4, alpha=8, dropout=0.3),
        record,
        ModelCheckpoint(root / "mid", every_n_train_steps=3, save_top_k=-1),
        ModelCheckpoint(root / "train_end", save_on_train_epoch_end=True, save_top_k=-1),
        ModelCheckpoint(root / "val_end", monitor="val/loss", save_top_k=-1),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(BagOfTokens(), datamodule=datamodule(kind, data_dir), ckpt_path=ckpt)
    return record, trainer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["instruction", "sentiment"])
def test_every_checkpoint_kind_resumes_into_the_same_batches_and_losses(tmp_path: Path, kind: str) -> None:
    data = write_data(tmp_path / "data", kind)  # 10 records, batch size 2: 5 steps an epoch
    reference, _ = fit(kind, data, tmp_path / "ref", max_steps=13)
    assert len(reference.steps) == 13
    orders = [[b for s, (b, _) in reference.steps.items() if (s - 1) // 5 == e] for e in (0, 1)]
    assert orders[0] != orders[1]  # a new order each epoch
    checkpoints = {
        "mid-epoch": tmp_path / "ref" / "mid" / "epoch=1-step=9.ckpt",
        "train-epoch-end hook": tmp_path / "ref" / "train_end" / "epoch=1-step=10.ckpt",
        "after validation": tmp_path / "ref" / "val_end" / "epoch=0-step=5.ckpt",
    }
    for name, checkpoint in checkpoints.items():
        assert checkpoint.is_file(), sorted(p.name for p in checkpoint.parent.iterdir())
        step = int(checkpoint.stem.rsplit("=", 1)[1])
        resumed, _ = fit(kind, data, tmp_path / name, max_steps=13, ckpt=checkpoint)
        assert sorted(resumed.steps) == list(range(step + 1, 14)), name
        for s, (batch, loss) in resumed.steps.items():
            assert batch == reference.steps[s][0], f"{name}: other batch at step {s}"
            assert loss == reference.steps[s][1], f"{name}: loss at step {s}"


def test_the_loader_state_is_the_epoch_and_the_batches_delivered(tmp_path: Path) -> None:
    dm = datamodule("instruction", write_data(tmp_path / "data", "instruction"))
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and loader.restorable
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler)
    loader.batch_sampler.sampler.set_epoch(3)  # what Lightning does at an epoch start
    full = [b["input_ids"].tolist() for b in loader]
    loader.batch_sampler.sampler.set_epoch(3)  # the sampler also advances on each pass: back to 3
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["epoch"] == 3 and state["batches"] == 2
    again = dm.train_dataloader()  # a new process: a fresh loader at epoch 0
    again.load_state_dict(state)
    assert [b["input_ids"].tolist() for b in again] == full[2:]
    assert [b["input_ids"].tolist() for b in again] != full  # the skip applies to one pass only
    with pytest.raises(ValueError, match="Not a ResumableDataLoader state"):
        again.load_state_dict({"epoch": -1})


@pytest.mark.slow
def test_a_restored_loader_with_persistent_workers_skips_once(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", "sentiment")

    def loader() -> DataLoader:
        dm = SentimentDataModule(data_dir=str(data), batch_size=2, max_length=24, seed=5, num_workers=1)
        return dm.train_dataloader()

    def epoch(dl: DataLoader, number: int) -> list[list[int]]:
        dl.sampler.set_epoch(number)  # type: ignore[attr-defined]  # as Lightning does
        return [b["input_ids"].tolist() for b in dl]

    reference = loader()
    assert reference.persistent_workers
    expected = [epoch(reference, 0), epoch(reference, 1)]
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 3})
    assert epoch(resumed, 0) == expected[0][3:]
    assert epoch(resumed, 1) == expected[1]  # the same workers, a whole epoch


@pytest.mark.slow
def test_a_resume_with_a_loader_the_package_cannot_restore_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class PlainShuffle(pl.LightningDataModule):
        """A user's data module: a plain DataLoader, shuffled from a seeded generator."""

        def __init__(self, inner: pl.LightningDataModule) -> None:
            super().__init__()
            self.inner = inner

        def train_dataloader(self) -> DataLoader:
            loader = self.inner.train_dataloader()
            generator = torch.Generator().manual_seed(1)
            return DataLoader(
                loader.dataset, 2, shuffle=True, generator=generator, collate_fn=loader.collate_fn
            )

        def val_dataloader(self) -> DataLoader:
            return self.inner.val_dataloader()

    data = write_data(tmp_path / "data", "sentiment")

    def run(ckpt: Path | None, dm: pl.LightningDataModule) -> None:
        every_2 = ModelCheckpoint(tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=4, limit_val_batches=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[LoRA(r=4), every_2],
        )  # fmt: skip
        trainer.fit(BagOfTokens(), datamodule=dm, ckpt_path=ckpt)

    run(None, PlainShuffle(datamodule("sentiment", data)))
    checkpoint = tmp_path / "ck" / "epoch=0-step=2.ckpt"
    message = "training data the package cannot restore: DataLoader (no state_dict/load_state_dict)"
    with caplog.at_level(logging.WARNING, logger="lightning_qlora"):
        run(checkpoint, PlainShuffle(datamodule("sentiment", data)))
    assert sum(message in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_qlora"):
        run(checkpoint, datamodule("sentiment", data))  # the packaged module: no warning
    assert not [r for r in caplog.records if "cannot restore" in r.getMessage()]


def test_epoch_random_sampler_depends_on_seed_and_epoch_only() -> None:
    sampler = EpochRandomSampler(range(50), seed=4)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(50))
    assert list(EpochRandomSampler(range(50), seed=4)) == first
