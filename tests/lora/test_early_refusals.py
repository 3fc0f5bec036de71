"""Mistakes that used to surface only after training are refused before the first step (Python API)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import TinyClassifier, TinyNet, toy_loader
from torch import nn

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora.quantization.convert import ExcludePatternError
from lightning_qlora.tasks import InstructionDataModule, SentimentDataModule, default_pretrained_path
from lightning_qlora.tasks.classification import check_tokenizer_files, load_tokenizer


class LateClassifier(TinyClassifier):
    """Builds its model in `configure_model`, which runs after Callback.setup."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.model: nn.Module | None = None  # type: ignore[assignment]
        self.lr = 1e-2
        self.losses = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = TinyNet()


def fit(module: pl.LightningModule, tmp_path: Path, **kwargs: object) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    trainer.fit(module, toy_loader())


def test_export_dir_that_is_a_file_is_refused_at_construction(tmp_path: Path) -> None:
    existing = tmp_path / "adapter"
    existing.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"export_dir=.*adapter' is an existing file"):
        LoRA(r=4, export_dir=existing)
    with pytest.raises(NotADirectoryError, match=r"lies under .*adapter', which is an existing file"):
        LoRA(r=4, export_dir=existing / "inner")
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link"
    link.symlink_to(folder)
    for ok in (folder, link, tmp_path / "new" / "deeper"):
        assert LoRA(r=4, export_dir=ok).export_dir == ok


@pytest.mark.parametrize("module_cls", [TinyClassifier, LateClassifier], ids=["init", "configure_model"])
def test_unknown_export_module_is_refused_before_the_first_step(tmp_path: Path, module_cls: type) -> None:
    module = module_cls()
    lora = LoRA(r=4, export_module="nope", export_dir=tmp_path / "adapter")
    with pytest.raises(AttributeError, match=r"export_module='nope' is not a submodule.*'model'"):
        fit(module, tmp_path, callbacks=[lora])
    assert module.losses == []  # nothing trained
    assert not (tmp_path / "adapter").exists()
    fine = module_cls()
    fit(fine, tmp_path, callbacks=[LoRA(r=4, export_module="model", export_dir=tmp_path / "adapter")])
    assert len(fine.losses) == 2 and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_precision_exclude_matching_nothing_is_refused_before_the_first_step(tmp_path: Path) -> None:
    module = TinyClassifier()
    with pytest.raises(
        ExcludePatternError,
        match=r"\['lm_haed'\] match no linear layer.*Did you mean \['lm_head', 'model.lm_head'\]\?",
    ):
        fit(module, tmp_path, plugins=[QLoRAPrecision(exclude=["lm_haed"])], callbacks=[LoRA(r=4)])
    assert module.losses == []
    kept = TinyClassifier()  # a pattern that matches is kept in full precision, as before
    fit(kept, tmp_path, plugins=[QLoRAPrecision(exclude=["net.0", "lm_head"])], callbacks=[LoRA(r=4)])
    assert type(kept.model.net[0].base_layer) is nn.Linear
    bert_like = TinyClassifier()  # "lm_head" next to a pattern that matches: still exempt
    fit(bert_like, tmp_path, plugins=[QLoRAPrecision(exclude=["lm_head", "net.2"])], callbacks=[LoRA(r=4)])
    default = TinyClassifier()
    del default.model.lm_head  # the default ('lm_head') may match nothing: many models have no head
    default.model.lm_head = nn.Identity()  # type: ignore[assignment]
    fit(default, tmp_path, plugins=[QLoRAPrecision()], callbacks=[LoRA(r=4)])


@pytest.fixture
def model_without_tokenizer(tmp_path: Path) -> Path:
    """A real BERT-style model folder (MiniLM's config and weights) whose tokenizer files were left out."""
    source = default_pretrained_path()
    folder = tmp_path / "bert_no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(source / name)
    return folder


def test_a_model_folder_without_tokenizer_files_is_refused(model_without_tokenizer: Path) -> None:
    expected = r"has no tokenizer files: expected tokenizer\.json or vocab\.txt .*found \['config\.json'"
    with pytest.raises(FileNotFoundError, match=expected):
        load_tokenizer(model_without_tokenizer)
    for datamodule in (SentimentDataModule, InstructionDataModule):  # refused when the data is configured
        with pytest.raises(FileNotFoundError, match=expected):
            datamodule(tokenizer_path=str(model_without_tokenizer))
    assert check_tokenizer_files(default_pretrained_path()) == default_pretrained_path()
    # what used to happen: transformers builds a tokenizer from the config alone and maps words to [UNK]
    from transformers import AutoTokenizer

    silent = AutoTokenizer.from_pretrained(str(model_without_tokenizer), local_files_only=True)
    assert torch.tensor(silent("the cat sat")["input_ids"]).unique().numel() <= 3


def test_precision_exclude_typo_is_refused_when_loading_quantized_too() -> None:
    from lightning_qlora import QuantizationConfig, load_quantized

    state = TinyNet().state_dict()
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(ExcludePatternError, match=r"\['lm_haed'\] match no linear layer of TinyNet"):
        load_quantized(model, state, QuantizationConfig(exclude=("lm_haed",)))
    assert all(p.device.type == "meta" for p in model.parameters())  # refused before any tensor loaded
