"""keep_sensitive: measured layers kept in full precision within a byte budget, through a real Trainer."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama
from torch import nn

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora._names import logical_name
from lightning_qlora.lora import LoRALinear, merge_adapters, save_peft_adapter
from lightning_qlora.quantization import (
    QuantizationConfig,
    is_linear4bit,
    load_quantized,
    replace_linear_layers,
)
from lightning_qlora.quantization.calibration import (
    CalibrationError,
    first_training_batch,
    training_step_loss,
)
from lightning_qlora.quantization.convert import quantization_targets
from lightning_qlora.quantization.sensitivity import choose_kept, choose_sensitive_layers
from lightning_qlora.tasks.token_loss import StepTokenMean

FRACTION = 0.25


class TinyLM(pl.LightningModule):
    """A two-layer Llama trained on its own tokens; counts tokens like the package's task modules."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(seed=0)
        self.tokens_seen = 0
        self.step_loss = StepTokenMean()  # the package's accumulator: what a step's gradients are scaled by

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss)
        self.tokens_seen += ids.numel()
        self.step_loss.add(loss, ids.numel())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def token_loader(shuffle: bool = False) -> torch.utils.data.DataLoader:
    ids = torch.randint(1, 128, (32, 12), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8, shuffle=shuffle)


class TokenData(pl.LightningDataModule):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return token_loader()

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return token_loader()


def trainer_with(plugin: QLoRAPrecision, init: str = "default") -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        plugins=[plugin],
        callbacks=[LoRA(r=4, alpha=8, dropout=0.0, init=init)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(keep: float) -> tuple[TinyLM, QLoRAPrecision]:
    torch.manual_seed(0)
    module = TinyLM()
    plugin = QLoRAPrecision(compute_dtype="float32", keep_sensitive=keep, log_report=False)
    trainer_with(plugin).fit(module, datamodule=TokenData())
    return module, plugin


@pytest.fixture(scope="module")
def fitted() -> tuple[TinyLM, QLoRAPrecision]:
    return fit(FRACTION)


def test_kept_layers_fit_the_budget_and_stay_plain_linears_with_adapters(
    fitted: tuple[TinyLM, QLoRAPrecision],
) -> None:
    module, plugin = fitted
    choice = plugin.sensitivity
    assert choice is not None and choice.kept, "the budget fits at least one layer of the tiny model"
    assert 0 < choice.extra_bytes <= choice.budget_bytes
    kept = set(choice.kept_names)
    for name, layer in module.named_modules():
        if isinstance(layer, LoRALinear):
            if name in kept:
                assert type(layer.base_layer) is nn.Linear
            elif not name.endswith("lm_head"):
                assert is_linear4bit(layer.base_layer), name
    # the bytes the report counts beyond the all-4-bit model are exactly the extra bytes the choice spent
    _, all_4bit = fit(0.0)
    assert plugin.report is not None and all_4bit.report is not None
    assert plugin.report.total_bytes - all_4bit.report.total_bytes == choice.extra_bytes
    assert choice.extra_bytes <= FRACTION * all_4bit.report.total_bytes
    assert plugin.report.quantized_layers == all_4bit.report.quantized_layers - len(kept)
    # every kept layer lowered the loss when measured, and together they lower it below the all-4-bit loss
    assert all(layer.effect > 0 for layer in choice.kept)
    assert choice.kept_loss < choice.four_bit_loss
    # kept layers are candidates that fit; unchecked, the most effect per extra byte that fits comes first
    fits = [m for m in choice.measured if m.effect > 0 and m.extra_bytes <= choice.budget_bytes]
    assert set(choice.kept) <= set(fits)
    first = min(fits, key=lambda m: (-m.effect / m.extra_bytes, m.name))
    assert first in choose_kept(choice.measured, choice.budget_bytes)


def test_report_names_the_kept_layers_with_effect_and_bytes(fitted: tuple[TinyLM, QLoRAPrecision]) -> None:
    _, plugin = fitted
    assert plugin.report is not None and plugin.sensitivity is not None
    table = plugin.report.table()
    assert "kept by sensitivity" in table
    for layer in plugin.sensitivity.kept:
        assert logical_name(layer.name) in table
        assert f"effect on the loss {layer.effect:+.4f}" in table
    row = plugin.report.as_dict()
    assert row["keep_sensitive"] == FRACTION
    assert row["sensitive_extra_bytes"] == plugin.sensitivity.extra_bytes
    assert set(str(row["sensitive_kept_layers"]).split(",")) == set(
        map(logical_name, plugin.sensitivity.kept_names)
    )


def loss_with(module: TinyLM, batch: Any, kept: Sequence[str]) -> float:
    """The training loss of a copy of `module` stored in 4-bit but for `kept` (and the LM head)."""
    copied = copy.deepcopy(module)
    replace_linear_layers(copied, QuantizationConfig(exclude=("lm_head", *kept)), compute_dtype=torch.float32)
    with torch.no_grad():
        return float(training_step_loss(copied, batch, torch.device("cpu"))())


def test_effect_is_the_loss_rise_with_that_layer_alone_in_4bit_and_kept_loss_is_measured() -> None:
    module = TinyLM()
    batch = next(iter(token_loader()))
    config = QuantizationConfig(compute_dtype="float32", keep_sensitive=0.1)
    targets = quantization_targets(module, QuantizationConfig())
    loss = training_step_loss(module, batch, torch.device("cpu"))
    choice = choose_sensitive_layers(module, targets, config, loss)
    assert choice.four_bit_loss == pytest.approx(loss_with(module, batch, []), abs=1e-5)
    top = max(choice.measured, key=lambda m: m.effect)
    rise = loss_with(module, batch, [n for n, _ in targets if n != top.name]) - choice.base_loss
    assert top.effect == pytest.approx(rise, abs=1e-5)
    assert choice.kept, "0.1 of the tiny model fits a layer that lowers the loss"
    assert choice.kept_loss == pytest.approx(loss_with(module, batch, choice.kept_names), abs=1e-5)
    # the other measure: the loss drop when the layer alone is kept, every other one in 4-bit
    kept_alone = choose_sensitive_layers(module, targets, config, loss, context="four_bit")
    drop = kept_alone.four_bit_loss - loss_with(module, batch, [top.name])
    assert next(m for m in kept_alone.measured if m.name == top.name).effect == pytest.approx(drop, abs=1e-5)


def test_measurement_is_deterministic_and_leaves_the_model_as_it_was() -> None:
    module = TinyLM()
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    targets = quantization_targets(module, QuantizationConfig())
    config = QuantizationConfig(keep_sensitive=0.2)
    batch = next(iter(token_loader()))
    runs = [
        choose_sensitive_layers(
            module, targets, config, training_step_loss(module, batch, torch.device("cpu"))
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert module.training and all(m.training for m in module.modules())
    assert module.tokens_seen == 0  # training_step's counter was put back, and the step's accumulator
    assert (module.step_loss.loss_sum, module.step_loss.tokens) == (0.0, 0)


def test_first_training_batch_leaves_the_rng_alone() -> None:
    module = TinyLM()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    module.train_dataloader = lambda: token_loader(shuffle=True)  # type: ignore[method-assign]
    module._trainer = trainer
    state = torch.get_rng_state()
    first = first_training_batch(module)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first_training_batch(module)[0], first[0])


def test_loaders_given_to_fit_are_refused_with_the_fix_before_quantizing() -> None:
    module = TinyLM()
    plugin = QLoRAPrecision(keep_sensitive=0.1, log_report=False)
    with pytest.raises(CalibrationError, match=r"calibration_batch.*datamodule"):
        trainer_with(plugin).fit(module, token_loader())
    assert not any(is_linear4bit(m) for m in module.modules())
    assert plugin.sensitivity is None


def test_keep_sensitive_composes_with_loftq(fitted: tuple[TinyLM, QLoRAPrecision]) -> None:
    """Measured on the full-precision model before LoftQ quantizes: the kept layers get plain adapters."""
    torch.manual_seed(0)
    module = TinyLM()
    plugin = QLoRAPrecision(compute_dtype="float32", keep_sensitive=FRACTION, log_report=False)
    trainer_with(plugin, init="loftq").validate(module, datamodule=TokenData(), verbose=False)
    assert plugin.sensitivity is not None and plugin.sensitivity.kept
    # the same measurement as without LoftQ (same model, same first batch): the same layers kept
    assert fitted[1].sensitivity is not None
    assert plugin.sensitivity.kept_names == fitted[1].sensitivity.kept_names
    kept = set(plugin.sensitivity.kept_names)
    for name, layer in module.named_modules():
        if not isinstance(layer, LoRALinear) or name.endswith("lm_head"):
            continue
        if name in kept:  # full precision, LoRA's own start (B = 0)
            assert type(layer.base_layer) is nn.Linear and not layer.lora_B.any(), name
        else:  # quantized by LoftQ, B from the residual
            assert is_linear4bit(layer.base_layer) and layer.lora_B.any(), name
    assert plugin.report is not None and plugin.report.sensitivity is plugin.sensitivity


def test_export_and_merge_work_with_kept_layers(
    fitted: tuple[TinyLM, QLoRAPrecision], tmp_path: Path
) -> None:
    module, plugin = fitted
    assert plugin.sensitivity is not None
    kept = plugin.sensitivity.kept_names[0]
    folder = save_peft_adapter(module.model, tmp_path / "adapter")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    short = kept.removeprefix("model.")
    assert any(short in key and "lora_B" in key for key in saved), sorted(saved)[:4]
    ids = next(iter(token_loader()))[0]
    module.eval()
    with torch.no_grad():
        adapted = module.model(input_ids=ids).logits
        merged = merge_adapters(copy.deepcopy(module.model))(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.01, "0.05", True, float("nan")])
def test_bad_keep_sensitive_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="keep_sensitive"):
        QuantizationConfig(keep_sensitive=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_sensitive"):
        QLoRAPrecision(keep_sensitive=bad)


def test_entry_points_that_cannot_measure_refuse_before_any_work() -> None:
    model = tiny_llama()
    config = QuantizationConfig(keep_sensitive=0.05)
    with pytest.raises(ValueError, match=r"load_quantized.*exclude="):
        load_quantized(model, {}, config)
    with pytest.raises(ValueError, match=r"replace_linear_layers.*exclude="):
        replace_linear_layers(model, config)
    assert not any(is_linear4bit(m) for m in model.modules())
    with pytest.raises(CalibrationError, match="calibration_batch"):
        QLoRAPrecision(keep_sensitive=0.05).convert_module(TinyLM())


def test_a_calibration_batch_set_on_the_plugin_is_measured_on() -> None:
    module = TinyLM()
    batch = next(iter(token_loader()))
    with torch.no_grad():
        expected = float(module.training_step(batch, 0))
    module.tokens_seen = 0
    plugin = QLoRAPrecision(keep_sensitive=0.1, compute_dtype="float32")
    plugin.calibration_batch = batch
    plugin.convert_module(module)  # no trainer: the batch set on the plugin is all it needs
    assert plugin.sensitivity is not None
    assert plugin.sensitivity.base_loss == pytest.approx(expected, abs=1e-6)
    assert module.tokens_seen == 0
