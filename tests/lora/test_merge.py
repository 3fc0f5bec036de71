"""Merging adapters into the base: a plain model with the adapted model's outputs, saved loadable anywhere."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import logits
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_qlora import merge_adapters, save_merged
from lightning_qlora.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_modules,
    inject_adapters,
    merge_in_place,
    merged_state_dict,
    unmerge_in_place,
)
from lightning_qlora.lora import merge as merge_module
from lightning_qlora.lora.merge import parse_size
from lightning_qlora.quantization import (
    QuantizationConfig,
    dequantize_weight,
    is_linear4bit,
    replace_linear_layers,
)
from lightning_qlora.quantization.layers import KEEP_FULL_PRECISION_ATTR

CONFIG = LoRAConfig(r=4, alpha=8.0, rank_pattern={"q_proj": 8})


def adapted(base: nn.Module, quantize: bool = False, config: LoRAConfig = CONFIG) -> nn.Module:
    model = copy.deepcopy(base)
    if quantize:
        replace_linear_layers(model, QuantizationConfig(compute_dtype=torch.float32), torch.float32)
    inject_adapters(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model.eval()


def assert_plain(model: nn.Module) -> None:
    """Nothing of this package or bitsandbytes is left: only torch's own layers and tensors."""
    for name, module in model.named_modules():
        assert not isinstance(module, LoRALinear), name
        assert not is_linear4bit(module), name
        assert KEEP_FULL_PRECISION_ATTR not in vars(module), name
        if isinstance(module, nn.Linear):
            assert type(module) is nn.Linear, name
    for name, param in model.named_parameters():
        assert type(param) is nn.Parameter, name  # no bitsandbytes Params4bit
        assert param.is_floating_point(), name


def test_merge_full_precision_base_matches_adapted_outputs(base: nn.Module, input_ids: torch.Tensor) -> None:
    model = adapted(base)
    expected = logits(model, input_ids)
    assert not torch.allclose(expected, logits(base, input_ids), atol=1e-3)
    merged = merge_adapters(model)
    assert merged is model  # in place
    assert_plain(merged)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # Only fp32 rounding differs: x W^T + s (x A^T) B^T versus x (W + s B A)^T.
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_4bit_base_dequantizes_and_matches_adapted_outputs(
    base: nn.Module, input_ids: torch.Tensor
) -> None:
    model = adapted(base, quantize=True, config=LoRAConfig(r=4, alpha=8.0, modules_to_save=("lm_head",)))
    expected = logits(model, input_ids)
    q_proj = model.model.layers[0].self_attn.q_proj
    want = dequantize_weight(q_proj.base_layer, torch.float32) + q_proj.delta_weight()
    merged = merge_adapters(model)
    assert_plain(merged)
    # The merged weight is the dequantized NF4 weight plus the update, bit for bit: merging adds no
    # quantization error of its own (the 4-bit forward dequantizes the same way on every call).
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, want, rtol=0, atol=0)
    # So outputs differ from the 4-bit adapted model's only by fp32 rounding in a different order of
    # operations, ~1e-7 relative per layer over two layers: 1e-5 is ample and far below NF4's own error.
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_a_bare_4bit_layer_and_a_root_adapter() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    replace_linear_layers(net, QuantizationConfig(compute_dtype=torch.float32, exclude=()))
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = net(x)
    merge_adapters(net)
    assert_plain(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)

    layer = LoRALinear(nn.Linear(32, 16), r=2, alpha=4.0)
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        expected = layer(x)
        plain = merge_adapters(layer)
        assert type(plain) is nn.Linear
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_in_place_and_unmerge_restore_the_weights(base: nn.Module, input_ids: torch.Tensor) -> None:
    model = adapted(base)
    expected = logits(model, input_ids)
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in adapter_modules(model)}

    merged = merge_in_place(model)
    assert len(merged) == 14
    layers = dict(adapter_modules(model))
    assert all(layer.merged for layer in layers.values())
    q_proj = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(layers[q_proj].base_layer.weight, before[q_proj])
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)

    unmerge_in_place(model)
    for name, layer in adapter_modules(model):
        assert not layer.merged
        # W + d - d in fp32: equal to W up to one rounding of |d| + |W| (~1e-7 relative).
        torch.testing.assert_close(layer.base_layer.weight, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_in_place_refuses_4bit_before_changing_anything(base: nn.Module) -> None:
    model = adapted(base, quantize=True)
    with pytest.raises(TypeError, match="merge_adapters"):
        merge_in_place(model)
    assert not any(layer.merged for _, layer in adapter_modules(model))


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-base", "nf4-base"])
def test_save_merged_loads_with_from_pretrained(
    quantize: bool, base: nn.Module, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = adapted(base, quantize=quantize)
    expected = logits(model, input_ids)
    folder = save_merged(model, tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    keys = set(load_file(str(folder / "model.safetensors")))
    assert keys == set(base.state_dict())  # the plain model's keys: no base_layer, lora or 4-bit stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert_plain(reloaded)
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=1e-5, atol=1e-5)
    # The adapted model was not touched.
    assert len(list(adapter_modules(model))) == 14
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)


def test_merged_in_bfloat16(base: nn.Module, input_ids: torch.Tensor, tmp_path: Path) -> None:
    model = adapted(base, quantize=True)
    expected = logits(model, input_ids)

    folder = save_merged(model, tmp_path / "merged", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(folder / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    assert reloaded.dtype == torch.bfloat16

    merged = merge_adapters(model, dtype=torch.bfloat16)
    assert_plain(merged)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    # bf16 keeps 8 bits of mantissa: logits agree to a few percent, not more.
    torch.testing.assert_close(logits(merged, input_ids).float(), expected, rtol=0.05, atol=0.1)


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many language models

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(ids))))


@pytest.mark.parametrize("max_shard_size", ["5GB", 3000], ids=["one-file", "sharded"])
def test_save_merged_plain_module(max_shard_size: str | int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedNet()
    reference = copy.deepcopy(model)
    inject_adapters(model, LoRAConfig(r=2, alpha=4.0, exclude=("head",)))
    model.eval()
    nn.init.normal_(model.hidden.lora_B)
    ids = torch.randint(0, 16, (4, 5))
    with torch.no_grad():
        expected = model(ids)

    folder = save_merged(model, tmp_path / "merged", max_shard_size=max_shard_size)
    if max_shard_size == "5GB":
        state = load_file(str(folder / "model.safetensors"))
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1
        state = {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
        assert set(index["weight_map"]) == set(state)
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(reference(ids), expected, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_keeps_ties_and_leaves_the_model(base: nn.Module) -> None:
    model = TiedNet()
    inject_adapters(model, LoRAConfig(r=2, exclude=("head",)))
    state = merged_state_dict(model, dtype=torch.bfloat16)
    assert state["head.weight"] is state["embed.weight"]
    assert state["head.weight"].dtype == torch.bfloat16
    assert isinstance(model.hidden, LoRALinear)
    assert model.embed.weight.dtype == torch.float32


def test_save_merged_failure_keeps_the_previous_folder(
    base: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = adapted(base)
    folder = save_merged(model, tmp_path / "merged")
    good = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "_save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_merged(model, folder, dtype=torch.bfloat16)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("500 mb") == 500 * 10**6
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")
