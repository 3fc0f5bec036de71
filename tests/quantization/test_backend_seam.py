"""The quantization backend seam: selection by name, clear errors, and a second backend (plain-torch int4,
registered here) going through QLoRAPrecision, the LoRA callback and a Trainer fit untouched."""

from __future__ import annotations

from collections.abc import Iterator

import bitsandbytes as bnb
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from quantization import toy_backend
from tiny_models import TinyClassifier, toy_loader
from torch import nn

from lightning_qlora import LoRA, QLoRAPrecision, merge_adapters
from lightning_qlora.quantization import QuantizationConfig, dequantize_weight, is_linear4bit, is_quantized
from lightning_qlora.quantization.backends import (
    backend_names,
    backend_of,
    get_backend,
    register_backend,
    unregister_backend,
)
from lightning_qlora.quantization.compute_dtype import resolve_compute_dtype
from lightning_qlora.quantization.layers import logical_numel, quantize_layer, to_linear4bit


@pytest.fixture
def toy() -> Iterator[str]:
    register_backend(toy_backend.NAME, lambda: toy_backend.BACKEND)
    try:
        yield toy_backend.NAME
    finally:
        unregister_backend(toy_backend.NAME)


def test_default_backend_is_bitsandbytes() -> None:
    assert QuantizationConfig().backend == "bitsandbytes"
    assert backend_names()[0] == "bitsandbytes"
    layer = to_linear4bit(nn.Linear(64, 32), QuantizationConfig(), torch.float32)
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert backend_of(layer) is get_backend("bitsandbytes")
    assert backend_of(nn.Linear(4, 4)) is None


def test_unknown_backend_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown quantization backend 'hqq'; allowed: bitsandbytes"):
        QuantizationConfig(backend="hqq")
    with pytest.raises(ValueError, match="allowed: bitsandbytes"):
        QLoRAPrecision(backend="hqq")


def test_registering_twice_or_removing_the_builtin_is_refused(toy: str) -> None:
    assert toy in backend_names()
    with pytest.raises(ValueError, match="already registered"):
        register_backend(toy, lambda: toy_backend.BACKEND)
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister_backend("bitsandbytes")


def test_toy_backend_layers_round_trip_through_the_package_functions(toy: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 20)
    original = linear.weight.detach().clone()
    layer = to_linear4bit(linear, QuantizationConfig(backend=toy), torch.float32)
    assert is_linear4bit(layer) and not is_quantized(layer)
    quantize_layer(layer)
    assert is_quantized(layer) and layer.weight.dtype == torch.uint8
    assert logical_numel(layer.weight) == 48 * 20
    weight = dequantize_weight(layer, torch.float32)
    assert 0 < (weight - original).abs().max() <= original.abs().max() / 14 + 1e-6  # half an int4 step
    fresh = to_linear4bit(nn.Linear(48, 20), QuantizationConfig(backend=toy), torch.float32)
    quantize_layer(fresh)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(dequantize_weight(fresh), weight)
    x = torch.randn(3, 48, requires_grad=True)
    assert torch.allclose(layer(x), nn.functional.linear(x, weight, layer.bias), atol=1e-6)


def test_toy_backend_trains_through_qlora_precision_and_lora(toy: str) -> None:
    seed_everything(0)
    module = TinyClassifier(lr=3e-2)
    precision = QLoRAPrecision(backend=toy, compute_dtype="float32", log_report=False)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=4,
        plugins=[precision],
        callbacks=[LoRA(r=4, alpha=8, dropout=0.0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, toy_loader())
    four_bit = [m for m in module.modules() if is_linear4bit(m)]
    assert len(four_bit) == 2  # both hidden layers; the head is excluded
    assert all(isinstance(m, toy_backend.ToyInt4Linear) for m in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    assert all(m.weight.dtype == torch.uint8 and m.weight.grad is None for m in four_bit)
    # adapters trained and the loss fell
    lora_b = [p for n, p in module.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    assert sum(module.losses[-4:]) < sum(module.losses[:4])
    # the report counts the toy format's bytes
    assert precision.report is not None
    assert precision.report.quantized_layers == 2
    assert precision.report.quantized_bytes == sum(toy_backend.BACKEND.storage_bytes(m) for m in four_bit)
    # and a merge dequantizes through the backend
    x = torch.randn(5, 32)
    expected = module(x)
    merged = merge_adapters(module.model)
    assert not any(is_linear4bit(m) for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


class _Bf16Toy(toy_backend.ToyInt4Backend):
    """The toy format on a CPU its backend calls bf16-native."""

    name = "toy_int4_bf16"

    def cpu_has_native_bf16(self) -> bool:
        return True


def test_auto_compute_dtype_asks_the_configured_backend() -> None:
    native = _Bf16Toy()
    register_backend(native.name, lambda: native)
    try:
        assert resolve_compute_dtype("auto", "cpu", native.name) == torch.bfloat16
        bnb_native = get_backend("bitsandbytes").cpu_has_native_bf16()
        assert resolve_compute_dtype("auto", "cpu") == (torch.bfloat16 if bnb_native else torch.float32)
        assert resolve_compute_dtype("float32", "cpu", native.name) == torch.float32  # explicit wins
        precision = QLoRAPrecision(backend=native.name, log_report=False)
        trainer = Trainer(
            accelerator="cpu",
            max_steps=1,
            plugins=[precision],
            callbacks=[LoRA(r=4, alpha=8, dropout=0.0)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(TinyClassifier(), toy_loader())
        assert precision.compute_dtype == torch.bfloat16
    finally:
        unregister_backend(native.name)
