"""The adapter protocol: a variant with another parameter is one new class, nothing else changes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lightning_qlora import LoRALinear, merge_adapters, save_peft_adapter
from lightning_qlora._modules import set_submodule
from lightning_qlora.lora import (
    AdapterModule,
    adapter_modules,
    adapter_params,
    is_adapter,
    set_trainable_params,
)
from lightning_qlora.lora.callback import trainable_state_keys


class MagnitudeLoRALinear(LoRALinear):
    """A DoRA-like test variant: LoRA plus a trainable per-output magnitude, `m * (W + s B A) x`.

    It implements the protocol by extending LoRALinear's answers; nothing in the package knows it.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float) -> None:
        super().__init__(base_layer, r=r, alpha=alpha)
        self.lora_magnitude_vector = nn.Parameter(torch.full((self.out_features,), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.lora_magnitude_vector

    def delta_weight(self) -> torch.Tensor:
        base = self.base_layer.weight.float()
        return self.lora_magnitude_vector.float()[:, None] * (base + super().delta_weight()) - base

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def peft_config_fields(self) -> dict[str, Any]:
        return {**super().peft_config_fields(), "use_dora": True}

    def peft_tensor_names(self) -> dict[str, str]:
        return {**super().peft_tensor_names(), "lora_magnitude_vector": "lora_magnitude_vector"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    set_submodule(model, "0", MagnitudeLoRALinear(model[0], r=2, alpha=4.0))
    set_submodule(model, "2", LoRALinear(model[2], r=2, alpha=4.0))
    with torch.no_grad():
        for _, layer in adapter_modules(model):
            layer.adapter_params()["lora_B"].normal_()  # a non-zero update, so merging is tested
    return model


def test_adapters_are_found_by_what_they_do() -> None:
    model = _model()
    assert [name for name, _ in adapter_modules(model)] == ["0", "2"]
    assert isinstance(model[0], AdapterModule)
    assert is_adapter(model[2])
    assert not is_adapter(model[0].base_layer)
    assert not is_adapter(nn.Linear(2, 2))
    assert sorted(adapter_params(model)) == [
        "0.lora_A",
        "0.lora_B",
        "0.lora_magnitude_vector",
        "2.lora_A",
        "2.lora_B",
    ]


def test_a_variants_extra_parameter_is_trained_and_checkpointed() -> None:
    model = _model()
    set_trainable_params(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model))
    assert "0.lora_magnitude_vector" in trainable
    assert not model[0].base_layer.weight.requires_grad
    # the LoRA callback's adapter-only checkpoint keeps exactly what trains
    assert trainable_state_keys(model) == trainable


def test_a_variant_is_exported_with_its_tensor_and_flag(tmp_path: Path) -> None:
    model = _model()
    save_peft_adapter(model, tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(tensors) == {
        "base_model.model.0.lora_A.weight",
        "base_model.model.0.lora_B.weight",
        "base_model.model.0.lora_magnitude_vector",
        "base_model.model.2.lora_A.weight",
        "base_model.model.2.lora_B.weight",
    }
    torch.testing.assert_close(tensors["base_model.model.0.lora_magnitude_vector"], torch.full((16,), 1.5))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert config["r"] == 2


def test_merging_goes_through_the_variants_delta_weight() -> None:
    model = _model()
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x)
        merged = merge_adapters(copy.deepcopy(model))
        assert not list(adapter_modules(merged))
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
