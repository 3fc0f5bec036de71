"""Arguments of the merge and loading functions that used to run (or crash late): refused, nothing changed."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import TinyClassifier, TinyNet, toy_loader

from lightning_qlora import (
    LoRA,
    QLoRAPrecision,
    load_peft_adapter,
    load_quantized,
    merge_adapters,
    save_merged,
    save_peft_adapter,
)
from lightning_qlora._settings import SettingTypeError
from lightning_qlora.lora import (
    LoRAConfig,
    PatternMatchError,
    adapter_modules,
    inject_adapters,
    merged_state_dict,
)
from lightning_qlora.lora.peft_checks import InvalidAdapterError
from lightning_qlora.quantization import is_linear4bit
from lightning_qlora.quantization.layers import KEEP_FULL_PRECISION_ATTR


def adapted_tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    inject_adapters(model, LoRAConfig(r=4, dropout=0.0))
    return model


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "bfloat16"], ids=str)
def test_merging_into_a_dtype_that_is_not_a_served_float_is_refused(tmp_path: Path, dtype: object) -> None:
    model = adapted_tiny()
    allowed = r"one of torch.float32, torch.bfloat16, torch.float16 or None"
    with pytest.raises(SettingTypeError, match=rf"save_merged dtype must be {allowed} .*got {dtype!r}"):
        save_merged(model, tmp_path / "merged", dtype=dtype)  # type: ignore[arg-type]
    assert not (tmp_path / "merged").exists()
    with pytest.raises(SettingTypeError, match=r"merged_state_dict dtype must be"):
        merged_state_dict(model, dtype=dtype)  # type: ignore[arg-type]
    with pytest.raises(SettingTypeError, match=r"merge_adapters dtype must be"):
        merge_adapters(model, dtype=dtype)  # type: ignore[arg-type]
    assert len(list(adapter_modules(model))) == 2  # still adapted: nothing was merged
    save_merged(model, tmp_path / "merged", dtype=torch.bfloat16)  # an allowed one still works


def test_load_quantized_with_a_format_name_instead_of_a_config_is_refused() -> None:
    source = TinyNet()
    model = TinyNet()
    with pytest.raises(SettingTypeError, match=r"got 'nf4' \(e.g. QuantizationConfig\(quant_type='nf4'\)\)"):
        load_quantized(model, source.state_dict(), "nf4")  # type: ignore[arg-type]
    assert not any(is_linear4bit(m) for m in model.modules())  # nothing replaced


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage", None], ids=["empty", "garbage", "truncated"])
def test_a_corrupt_adapter_weights_file_is_named(tmp_path: Path, content: bytes | None) -> None:
    folder = save_peft_adapter(adapted_tiny(), tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if content is None else content)
    fresh = TinyNet()
    with pytest.raises(
        InvalidAdapterError, match=rf"{weights} is not a readable safetensors file .*truncated"
    ):
        load_peft_adapter(fresh, folder)
    assert not list(adapter_modules(fresh))  # the model was not touched


def test_excluding_every_layer_says_so_before_the_first_step(tmp_path: Path) -> None:
    module = TinyClassifier()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[LoRA(r=4, exclude=("*",))],
    )  # fmt: skip
    nothing = r"LoRA would adapt no layer of TinyClassifier: .*exclude=\['\*'\] leave out every linear layer"
    with pytest.raises(PatternMatchError, match=nothing):
        trainer.fit(module, toy_loader())
    assert module.losses == []
    assert not list(adapter_modules(module))


def fit_tiny(module: pl.LightningModule, root: Path, **kwargs: object) -> None:
    pl.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **kwargs,  # type: ignore[arg-type]
    ).fit(module, toy_loader())  # fmt: skip


def test_a_second_fit_with_another_rank_is_refused(tmp_path: Path) -> None:
    module = TinyClassifier()
    fit_tiny(module, tmp_path, callbacks=[LoRA(r=4)])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"already adapted with other ranks .*'model.net.0' \(r=4, asked r=8\)"
    ):
        fit_tiny(module, tmp_path, callbacks=[LoRA(r=8)])
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    fit_tiny(module, tmp_path, callbacks=[LoRA(r=4)])  # the same rank trains on
    assert len(module.losses) == 4


class TrainsEverything(TinyClassifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # frozen 4-bit weights included


def test_qlora_precision_without_adapters_says_the_quantized_layers_are_frozen(tmp_path: Path) -> None:
    module = TrainsEverything()
    frozen = r"holds \d+ 4-bit weight\(s\) .*which are frozen.*Add the LoRA callback"
    with pytest.raises(ValueError, match=frozen):
        fit_tiny(module, tmp_path, plugins=[QLoRAPrecision(compute_dtype="float32")])
    assert module.losses == []
    with_adapters = TrainsEverything()  # the same optimizer beside LoRA adapters: their frozen base is idle
    fit_tiny(
        with_adapters, tmp_path, plugins=[QLoRAPrecision(compute_dtype="float32")], callbacks=[LoRA(r=4)]
    )
    assert len(with_adapters.losses) == 2


def test_a_refused_injection_leaves_modules_to_save_unmarked() -> None:
    """modules_to_save are flagged (kept in full precision, trainable) only once every check passed."""
    model = TinyNet()
    with pytest.raises(ValueError, match=r"LoRA rank too large"):
        inject_adapters(model, LoRAConfig(r=10**6, modules_to_save=("lm_head",)))
    assert KEEP_FULL_PRECISION_ATTR not in vars(model.lm_head)
    assert not list(adapter_modules(model))
    inject_adapters(model, LoRAConfig(r=4, modules_to_save=("lm_head",)))
    assert getattr(model.lm_head, KEEP_FULL_PRECISION_ATTR) is True
