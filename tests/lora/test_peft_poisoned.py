"""Untrusted adapter folders: every poisoned one is refused with one clear error, the model left unchanged."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import logits
from torch import nn

from lightning_qlora import load_peft_adapter, save_peft_adapter
from lightning_qlora.lora import LoRAConfig, adapter_modules, inject_adapters
from lightning_qlora.lora.peft_checks import InvalidAdapterError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def good_folder(base: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for _, layer in adapter_modules(model):
            layer.lora_B.normal_(std=0.1)
    return save_peft_adapter(model, tmp_path_factory.mktemp("good") / "adapter")


Tensors = dict[str, torch.Tensor]


def poisoned(
    good: Path,
    tmp_path: Path,
    config: Callable[[Any], Any] | None = None,
    weights: Callable[[Tensors], Tensors] | None = None,
) -> Path:
    folder = tmp_path / "poisoned"
    shutil.copytree(good, folder)
    if config is not None:
        raw = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps(config(raw)))  # json writes NaN/Infinity for float nan/inf
    if weights is not None:
        save_file(weights(load_file(folder / WEIGHTS)), folder / WEIGHTS)
    return folder


def set_key(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda raw: {**raw, key: value}


def first_b(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))


def with_nan(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = first_b(tensors)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return tensors


CASES: dict[str, tuple[dict[str, Any], str]] = {
    "alpha negative": ({"config": set_key("lora_alpha", -16)}, "lora_alpha must be a finite positive number"),
    "alpha nan": ({"config": set_key("lora_alpha", math.nan)}, "lora_alpha must be a finite positive number"),
    "alpha inf": ({"config": set_key("lora_alpha", math.inf)}, "lora_alpha must be a finite positive number"),
    "alpha 1e308": ({"config": set_key("lora_alpha", 1e308)}, "overflows float32"),
    "alpha a string": ({"config": set_key("lora_alpha", "16")}, "lora_alpha must be"),
    "r zero": ({"config": set_key("r", 0)}, "r must be a positive integer"),
    "r a bool": ({"config": set_key("r", True)}, "r must be a positive integer"),
    "r a float": ({"config": set_key("r", 4.0)}, "r must be a positive integer"),
    "dropout 1": ({"config": set_key("lora_dropout", 1.0)}, "lora_dropout must be"),
    "bad rank_pattern regex": ({"config": set_key("rank_pattern", {"q_proj(": 4})}, "not a valid regular"),
    "rank_pattern a list": ({"config": set_key("rank_pattern", ["q_proj"])}, "rank_pattern must be a JSON"),
    "alpha_pattern nan": ({"config": set_key("alpha_pattern", {"q_proj": math.nan})}, "alpha_pattern"),
    "config a list": ({"config": lambda raw: [raw]}, "holds a JSON list"),
    "unknown key": ({"config": set_key("lora_magic", 3)}, "does not know: 'lora_magic'"),
    "layer replication": ({"config": set_key("layer_replication", [[0, 2]])}, "layer_replication"),
    "bias all": ({"config": set_key("bias", "all")}, "bias must be"),
    "undeclared base weight": (
        {"weights": lambda t: {**t, f"{PREFIX}lm_head.weight": torch.full((128, 64), math.nan)}},
        "neither LoRA weights nor inside a modules_to_save",
    ),
    "finite undeclared base weight": (
        {"weights": lambda t: {**t, f"{PREFIX}model.norm.weight": torch.zeros(64)}},
        "would overwrite the base model's weights",
    ),
    "nan adapter tensor": ({"weights": with_nan}, "NaN or inf in 1 tensor"),
    "integer adapter tensor": (
        {"weights": lambda t: {**t, first_b(t): t[first_b(t)].to(torch.int32)}},
        "non-floating dtype",
    ),
    "empty weights": ({"weights": lambda t: {}}, "holds no tensors"),
    "lora for an undeclared module": (
        {"config": set_key("target_modules", ["q_proj"])},
        "which its target_modules",
    ),
}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("preadapted", [False, True], ids=["fresh", "adapted"])
def test_poisoned_folder_is_refused_and_the_model_is_unchanged(
    base: nn.Module, good_folder: Path, tmp_path: Path, input_ids: torch.Tensor, case: str, preadapted: bool
) -> None:
    edits, message = CASES[case]
    folder = poisoned(good_folder, tmp_path, **edits)
    model = copy.deepcopy(base)
    if preadapted:
        inject_adapters(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
        model.eval()
    before, out_before = snapshot(model), logits(model, input_ids)
    with pytest.raises(InvalidAdapterError, match=message) as info:
        load_peft_adapter(model, folder)
    assert str(folder) in str(info.value)
    after = snapshot(model)
    assert after.keys() == before.keys()  # no adapter injected
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(logits(model, input_ids), out_before, rtol=0, atol=0)


def test_the_good_folder_still_loads(base: nn.Module, good_folder: Path, input_ids: torch.Tensor) -> None:
    model = copy.deepcopy(base)
    loaded = load_peft_adapter(model, good_folder)
    assert len(loaded) == 14
    assert torch.isfinite(logits(model, input_ids)).all()
