"""The sentiment example on the packaged data and the real all-MiniLM-L6-v2 weights (no mocks)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_qlora.tasks import SentimentDataModule, TextClassifier, default_pretrained_path


class TrainableClassifier(TextClassifier):
    """The package's strategy installs the optimizer; a plain Trainer needs one from the module."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


@pytest.fixture(scope="module")
def datamodule() -> SentimentDataModule:
    dm = SentimentDataModule(batch_size=16)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def classifier() -> TextClassifier:
    torch.manual_seed(0)
    return TextClassifier()


def test_packaged_sentiment_data(datamodule: SentimentDataModule) -> None:
    train, val = datamodule.datasets["train"], datamodule.datasets["validation"]
    assert (len(train), len(val)) == (480, 120)
    for ds in (train, val):
        labels = ds["labels"]
        assert set(labels) == {0, 1}
        assert sum(labels) * 2 == len(labels)  # balanced
        assert max(len(ids) for ids in ds["input_ids"]) <= datamodule.max_length
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 16
    pad_id = datamodule.tokenizer.pad_token_id
    assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != pad_id)
    # the seeded generator makes the shuffled order reproducible
    again = next(iter(datamodule.train_dataloader()))
    assert torch.equal(batch["input_ids"], again["input_ids"])


def test_forward_backward_on_real_weights(
    classifier: TextClassifier, datamodule: SentimentDataModule
) -> None:
    batch = next(iter(datamodule.val_dataloader()))
    classifier.train()
    logits = classifier(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (batch["input_ids"].shape[0], 2)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    loss.backward()
    assert classifier.classifier.weight.grad is not None
    query = classifier.model.encoder.layer[0].attention.self.query.weight
    assert query.grad is not None
    assert query.grad.abs().sum() > 0
    classifier.zero_grad()
    assert classifier.hparams["num_labels"] == 2
    assert classifier.hparams["pooling"] == "mean"


def test_mean_pooling_ignores_padding(classifier: TextClassifier, datamodule: SentimentDataModule) -> None:
    tok = datamodule.tokenizer
    texts = ["Great food.", "The soup arrived lukewarm and tasted mostly of salt, sadly."]
    classifier.eval()
    with torch.no_grad():
        alone = tok(texts[:1], return_tensors="pt")
        padded = tok(texts, return_tensors="pt", padding=True)
        assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
        a = classifier(alone["input_ids"], alone["attention_mask"])
        b = classifier(padded["input_ids"], padded["attention_mask"])[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_short_fit_logs_metrics_and_counts_tokens(datamodule: SentimentDataModule) -> None:
    torch.manual_seed(0)
    model = TrainableClassifier()
    head_before = model.classifier.weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    for name in ("train/loss", "val/loss", "val/acc", "val/f1", "train/tokens_seen", "train/tokens_per_s"):
        assert name in metrics, name
        assert torch.isfinite(metrics[name])
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert not torch.equal(head_before, model.classifier.weight)
    # the same seeded order: the tokens seen are the real tokens of the first three training batches
    loader = iter(datamodule.train_dataloader())
    expected = sum(int(next(loader)["attention_mask"].sum()) for _ in range(3))
    assert model.tokens_seen == expected
    assert float(metrics["train/tokens_seen"]) == expected


def test_missing_paths_raise_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*config\.json and model\.safetensors"):
        TextClassifier(pretrained_path=str(missing))
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        TextClassifier(pretrained_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl"):
        SentimentDataModule(data_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="pooling"):
        TextClassifier(pooling="max")


def test_default_model_folder_is_the_bundled_minilm() -> None:
    folder = default_pretrained_path()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
