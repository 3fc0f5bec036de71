"""The instruction-tuning example on the packaged alpaca data with the real MiniLM tokenizer (no mocks)."""

from __future__ import annotations

import logging
import math
import unicodedata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.loggers import Logger
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from lightning_qlora.resumable import EpochRandomSampler
from lightning_qlora.tasks import (
    CausalLMInstructionModule,
    InstructionDataModule,
    LengthGroupedBatchSampler,
    encode_instruction,
    format_prompt,
)
from lightning_qlora.tasks.instruction import special_token_ids

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}


class TrainableLM(CausalLMInstructionModule):
    """The package's strategy installs the optimizer; a plain Trainer needs one from the module."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class TextCollectingLogger(Logger):
    """A real (minimal) logger with ``log_text``, the method WandbLogger provides."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "collect"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_text(self, key: str, columns: list[str], data: list[list[str]], step: int | None = None) -> None:
        self.texts.append({"key": key, "columns": columns, "data": data, "step": step})


def normalized(text: str) -> str:
    """What an uncased WordPiece round trip keeps: lower case, no accents, no whitespace."""
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in text if not c.isspace() and not unicodedata.combining(c))


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": 3,
        "limit_train_batches": 3,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def datamodule() -> InstructionDataModule:
    dm = InstructionDataModule(batch_size=8)
    dm.setup("fit")
    return dm


def test_format_prompt_with_and_without_input() -> None:
    with_input = format_prompt({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    assert "### Input:\n2 and 3" in with_input
    assert with_input.endswith("### Response:\n")
    without = format_prompt({"instruction": "Name a color.", "input": "", "output": "Red."})
    assert "### Input" not in without
    assert "### Instruction:\nName a color." in without


def test_labels_mask_everything_but_the_response(datamodule: InstructionDataModule) -> None:
    tok = datamodule.tokenizer
    bos, eos, _ = special_token_ids(tok)
    assert (bos, eos) == (tok.cls_token_id, tok.sep_token_id)  # WordPiece: [CLS]/[SEP] stand in
    for split in ("train", "validation"):
        raw, encoded = datamodule.raw[split], datamodule.datasets[split]
        assert len(raw) == {"train": 160, "validation": 40}[split]
        for record, ex in zip(raw, encoded, strict=True):
            ids, labels = ex["input_ids"], ex["labels"]
            response = [i for i, label in enumerate(labels) if label != -100]
            assert response == list(range(response[0], len(ids)))  # one block, at the end
            assert [labels[i] for i in response] == [ids[i] for i in response]
            assert ids[0] == bos
            assert ids[-1] == eos
            text = tok.decode([ids[i] for i in response[:-1]])
            assert normalized(text) == normalized(record["output"])
            prompt = tok.decode(ids[1 : response[0]])
            assert normalized(prompt) == normalized(format_prompt(record))


def test_collate_pads_inputs_and_masks_padding(datamodule: InstructionDataModule) -> None:
    batch = next(iter(datamodule.val_dataloader()))
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the first validation batch has mixed lengths
    assert (batch["labels"][~mask] == -100).all()
    assert (batch["input_ids"][~mask] == datamodule.tokenizer.pad_token_id).all()
    real = batch["labels"] != -100
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])


def test_truncation_keeps_part_of_the_response(datamodule: InstructionDataModule) -> None:
    record = max(datamodule.raw["train"], key=lambda r: len(format_prompt(r)) + len(r["output"]))
    ex = encode_instruction(record, datamodule.tokenizer, max_length=32)
    assert len(ex["input_ids"]) == 32
    n_response = sum(label != -100 for label in ex["labels"])
    assert n_response >= 32 // 4
    assert datamodule.tokenizer.decode(ex["input_ids"][:-n_response]).endswith("response :")


def grouped(lengths: list[int], seed: int = 3, **kwargs: Any) -> LengthGroupedBatchSampler:
    return LengthGroupedBatchSampler(
        EpochRandomSampler(range(len(lengths)), seed), 8, lengths=lengths, **kwargs
    )


@pytest.mark.parametrize("drop_last", [False, True])
def test_length_grouped_sampler_yields_every_index_once(drop_last: bool) -> None:
    lengths = [(i * 37) % 101 for i in range(103)]
    sampler = grouped(lengths, mega_batch_mult=4, drop_last=drop_last)
    first, second = list(sampler), list(sampler)
    for batches in (first, second):
        assert len(batches) == len(sampler)
        flat = sorted(i for b in batches for i in b)
        if drop_last:
            assert all(len(b) == 8 for b in batches)
            assert len(flat) == len(set(flat)) == 96
        else:
            assert flat == list(range(103))
        assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    assert first != second  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # ...and reproducible
    with pytest.raises(ValueError, match="mega_batch_mult must be a positive integer, got 0"):
        grouped(lengths, mega_batch_mult=0)


def test_under_ddp_lightning_gives_each_rank_its_own_length_grouped_shard(
    datamodule: InstructionDataModule,
) -> None:
    """Lightning's own DDP loader re-creation: disjoint shards, equal batch counts, grouping kept."""
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = datamodule.train_dataloader()  # as Lightning requests it from the hook
    lengths = [len(ids) for ids in datamodule.datasets["train"]["input_ids"]]
    shards = []
    for rank in (0, 1):
        distributed = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=42)
        ddp_loader = _update_dataloader(loader, distributed, mode=RunningStage.TRAINING)
        assert isinstance(ddp_loader.batch_sampler, LengthGroupedBatchSampler)
        assert ddp_loader.batch_sampler.sampler is distributed
        shards.append(list(ddp_loader.batch_sampler))
    assert len(shards[0]) == len(shards[1]) == math.ceil(math.ceil(len(lengths) / 2) / 8)
    seen = [{i for b in shard for i in b} for shard in shards]
    assert len(seen[0] & seen[1]) <= 1  # disjoint (DistributedSampler pads one index when the count is odd)
    assert seen[0] | seen[1] == set(range(len(lengths)))
    for shard in shards:  # still grouped: little padding within each batch
        padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in shard)
        assert padding < 0.2 * sum(lengths[i] for b in shard for i in b)


def test_length_grouping_reduces_padding_on_the_real_data(datamodule: InstructionDataModule) -> None:
    lengths = [len(ids) for ids in datamodule.datasets["train"]["input_ids"]]

    def padded_tokens(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped_tokens = padded_tokens(list(grouped(lengths, seed=0)))
    random_batches = []
    for seed in range(5):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        random_batches.append(padded_tokens([order[i : i + 8] for i in range(0, len(order), 8)]))
    real = sum(lengths)
    random_padding = sum(random_batches) / len(random_batches) - real
    assert grouped_tokens - real < 0.5 * random_padding
    # the datamodule uses the grouped sampler by default
    loader = datamodule.train_dataloader()
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler)
    assert sum(b["input_ids"].numel() for b in loader) - real < 0.5 * random_padding


def test_fit_from_tiny_config_logs_metrics_and_samples(
    datamodule: InstructionDataModule, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = TrainableLM(model_config=TINY, num_samples_to_generate=2, max_new_tokens=4)
    assert model.model.config.vocab_size == len(datamodule.tokenizer)
    with caplog.at_level(logging.INFO, logger="lightning_qlora.tasks"):
        trainer().fit(model, datamodule=datamodule)
    metrics = model.trainer.callback_metrics
    for name in ("train/loss", "val/loss", "val/ppl", "train/tokens_seen", "train/tokens_per_s"):
        assert name in metrics, name
        assert torch.isfinite(metrics[name]), name
    assert model.tokens_seen > 0
    assert model.tokens_seen == int(metrics["train/tokens_seen"])
    samples = [r for r in caplog.records if r.name == "lightning_qlora.tasks" and "prompt:" in r.getMessage()]
    assert len(samples) == 2
    assert "below is an instruction" in samples[0].getMessage()


def test_perplexity_is_exp_of_the_response_loss(datamodule: InstructionDataModule) -> None:
    torch.manual_seed(0)
    model = CausalLMInstructionModule(model_config=TINY)
    (metrics,) = trainer(limit_val_batches=1).validate(model, datamodule=datamodule, verbose=False)
    # one batch: HF's loss is the mean over response tokens, so the shifted perplexity must match it
    assert math.isclose(metrics["val/ppl"], math.exp(metrics["val/loss"]), rel_tol=1e-4)
    assert metrics["val/ppl"] > 1000  # untrained: close to the vocabulary size, not to 1


def test_save_pretrained_round_trip_and_fit(tmp_path: Path, datamodule: InstructionDataModule) -> None:
    torch.manual_seed(0)
    built = CausalLMInstructionModule(model_config=TINY)
    built.model.save_pretrained(tmp_path)
    built.tokenizer.save_pretrained(tmp_path)
    loaded = TrainableLM(pretrained_path=str(tmp_path), max_new_tokens=4)
    batch = next(iter(datamodule.val_dataloader()))
    assert loaded.model.training  # ready for training despite from_pretrained's eval mode
    built.eval()
    loaded.eval()
    with torch.no_grad():
        a = built(batch["input_ids"], batch["attention_mask"]).logits
        b = loaded(batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(a, b)
    collect = TextCollectingLogger()
    loaded.train()
    dm = InstructionDataModule(tokenizer_path=str(tmp_path), batch_size=8)
    trainer(logger=collect).fit(loaded, datamodule=dm)
    assert loaded.trainer.global_step == 3
    assert torch.isfinite(loaded.trainer.callback_metrics["train/loss"])
    (entry,) = collect.texts
    assert entry["key"] == "val/samples"
    assert entry["columns"] == ["prompt", "response"]
    assert len(entry["data"]) == 2
    assert all(len(row) == 2 for row in entry["data"])


def test_missing_paths_and_conflicting_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent.*config\.json and model\.safetensors"):
        CausalLMInstructionModule(pretrained_path=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="either"):
        CausalLMInstructionModule(pretrained_path=str(tmp_path), model_config=TINY)
    with pytest.raises(FileNotFoundError, match=r"tokenizer_path"):
        InstructionDataModule(tokenizer_path=str(tmp_path / "absent")).setup()


def test_fit_refuses_a_datamodule_with_another_tokenizer(
    tmp_path: Path, datamodule: InstructionDataModule
) -> None:
    other = datamodule.tokenizer.__class__.from_pretrained(str(datamodule.tokenizer_path))
    other.add_tokens(["<extra_token>"])
    other.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a tokenizer folder passes the folder check
    model = TrainableLM(model_config=TINY, tokenizer_path=str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer differs"):
        trainer().fit(model, datamodule=datamodule)
