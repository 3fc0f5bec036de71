"""Adapter variants by registry: a variant defined here alone trains, exports and reloads through the package.

`GatedLoRALinear` multiplies LoRA's update by a learned scalar gate. Nothing in the package knows it: one
`register_variant` call makes `LoRA(variant="gated")` inject it, the PEFT-format export write its gate and
flag, and `load_peft_adapter` rebuild it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import TinyClassifier, TinyNet, toy_loader
from torch import nn

from lightning_qlora import LoRA, LoRAConfig, LoRALinear
from lightning_qlora.lora import (
    AdapterVariant,
    ExtraTensor,
    UnknownVariantError,
    adapter_modules,
    get_variant,
    load_peft_adapter,
    register_variant,
    unregister_variant,
)
from lightning_qlora.lora.peft_checks import InvalidAdapterError

GATE = "lora_gate"


class GatedLoRALinear(LoRALinear):
    """LoRA whose update is scaled by a trainable scalar: `W x + g * s * B A x`, g starting at 1."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        scaling: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, scaling=scaling, dtype=dtype)
        self.lora_gate = nn.Parameter(torch.ones(1, dtype=dtype, device=base_layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        down = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)
        update = F.linear(down, self.lora_B) * (self.scaling * self.lora_gate)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight() * self.lora_gate.detach().float()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), GATE: self.lora_gate}

    def peft_config_fields(self) -> dict[str, Any]:
        return {**super().peft_config_fields(), "use_lora_gate": True}

    def peft_tensor_names(self) -> dict[str, str]:
        return {**super().peft_tensor_names(), GATE: GATE}


GATED = AdapterVariant(
    name="gated",
    title="gated LoRA",
    layer_class=GatedLoRALinear,
    peft_fields={"use_lora_gate": True},
    extra_tensors=(ExtraTensor(GATE, "gate", lambda in_f, out_f, r: (1,)),),
    supports_loftq=False,
)


@pytest.fixture
def gated() -> Iterator[AdapterVariant]:
    register_variant(GATED)
    yield GATED
    unregister_variant(GATED.name)


def _trainer(tmp_path: Path, callback: LoRA) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_a_registered_variant_trains_exports_and_reloads(tmp_path: Path, gated: AdapterVariant) -> None:
    torch.manual_seed(0)
    module = TinyClassifier(lr=5e-2)
    callback = LoRA(r=4, alpha=8, dropout=0.0, variant="gated", export_dir=tmp_path / "adapter")
    _trainer(tmp_path, callback).fit(module, toy_loader())

    layers = dict(adapter_modules(module.model))
    assert set(layers) == {"net.0", "net.2"}
    assert all(type(layer) is GatedLoRALinear for layer in layers.values())
    gates = {name: float(layer.lora_gate.detach()) for name, layer in layers.items()}
    assert all(gate != 1.0 for gate in gates.values())  # the gate trained with A and B
    assert module.losses[-1] < module.losses[0]

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert float(tensors["base_model.model.net.0.lora_gate"]) == gates["net.0"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_lora_gate"] is True and config["use_dora"] is False

    torch.manual_seed(0)
    fresh = TinyNet()  # the same base weights, no adapters
    assert sorted(load_peft_adapter(fresh, tmp_path / "adapter")) == ["net.0", "net.2"]
    assert all(type(layer) is GatedLoRALinear for _, layer in adapter_modules(fresh))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), module.model.eval()(x), rtol=0, atol=1e-6)


def test_a_folder_of_the_variant_without_its_tensors_is_refused(
    tmp_path: Path, gated: AdapterVariant
) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    LoRA(r=2, dropout=0.0, variant="gated", target_modules=("net.0",)).inject(model)
    from lightning_qlora import save_peft_adapter

    folder = save_peft_adapter(model, tmp_path / "adapter")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.endswith(GATE)}, str(folder / "adapter_model.safetensors")
    )
    fresh = TinyNet()
    with pytest.raises(InvalidAdapterError, match=r"sets use_lora_gate, but without a gate: 'net\.0'"):
        load_peft_adapter(fresh, folder)
    assert not list(adapter_modules(fresh))  # refused before anything changed


def test_an_unknown_variant_names_the_registered_ones(gated: AdapterVariant) -> None:
    with pytest.raises(
        UnknownVariantError, match=r"Unknown LoRA variant 'gatd'; registered variants: dora, gated, lora"
    ):
        LoRA(variant="gatd")
    assert LoRAConfig(variant="gated").variant_name == "gated"
    assert LoRAConfig(use_dora=True).variant_name == get_variant("dora").name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"init": "loftq"},
            r"init='loftq' is not available for gated LoRA .* applies to DoRA and plain LoRA",
        ),
        ({"share_sibling_input": True}, "share_sibling_input=True applies to plain LoRA only; gated LoRA"),
        ({"use_dora": True}, r"use_dora=True asks for DoRA, but variant='gated'"),
    ],
)
def test_what_a_variant_does_not_support_is_refused(
    gated: AdapterVariant, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig(variant="gated", **kwargs)  # type: ignore[arg-type]


def test_registration_refuses_clashes_and_non_adapters(gated: AdapterVariant) -> None:
    with pytest.raises(ValueError, match="'gated' is already registered"):
        register_variant(GATED)
    with pytest.raises(TypeError, match="implementing the adapter protocol"):
        register_variant(AdapterVariant(name="plain", title="x", layer_class=nn.Linear, peft_fields={"x": 1}))
    with pytest.raises(ValueError, match="same fields as 'dora'"):
        register_variant(
            AdapterVariant(
                name="dora2", title="x", layer_class=GatedLoRALinear, peft_fields={"use_dora": True}
            )
        )
    with pytest.raises(ValueError, match=r"extra tensor keys must start with 'lora_'.*\['gate'\]"):
        register_variant(
            AdapterVariant(
                name="ungated",
                title="x",
                layer_class=GatedLoRALinear,
                peft_fields={"use_gate": True},
                extra_tensors=(ExtraTensor("gate", "gate", lambda in_f, out_f, r: (1,)),),
            )
        )
    with pytest.raises(ValueError, match="built-in adapter variant 'lora' cannot be unregistered"):
        unregister_variant("lora")
