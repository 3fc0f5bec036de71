"""Settings: one source of defaults (the dataclasses), and every bad value refused with one clear error."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_qlora import LoRA, LoRAConfig, OptimizerConfig, QLoRAPrecision, QuantizationConfig
from lightning_qlora.lora import adapter_modules, inject_adapters
from lightning_qlora.lora.config import ADAPTER_DTYPES


def test_keywords_build_the_config_without_restating_defaults() -> None:
    assert LoRA(r=8).config == LoRAConfig(r=8)
    assert LoRA().config == LoRAConfig()
    assert QLoRAPrecision(blocksize=128).config == QuantizationConfig(blocksize=128)
    assert QLoRAPrecision().config == QuantizationConfig()
    # the signature shown to users (help(), IDEs) carries the dataclass's defaults
    assert inspect.signature(LoRA).parameters["r"].default == LoRAConfig().r
    assert inspect.signature(QLoRAPrecision).parameters["blocksize"].default == QuantizationConfig().blocksize


def test_a_config_object_is_accepted_and_keywords_replace_its_fields() -> None:
    config = LoRAConfig(r=4, alpha=8.0, target_modules=("q_proj",))
    assert LoRA(config).config is config
    assert LoRA(config=config, r=2).config == LoRAConfig(r=2, alpha=8.0, target_modules=("q_proj",))
    quantization = QuantizationConfig(quant_type="fp4", double_quant=False)
    assert QLoRAPrecision(config=quantization).config is quantization
    assert QLoRAPrecision(quantization, blocksize=32).config.blocksize == 32


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoRA(rr=8), r"LoRA got unexpected argument\(s\) \['rr'\]; allowed: config, export_dir"),
        (
            lambda: QLoRAPrecision(quant=4),
            r"QLoRAPrecision got unexpected argument\(s\) \['quant'\]; allowed",
        ),
        (lambda: LoRA(config={"r": 8}), r"LoRA config must be a LoRAConfig, got \{'r': 8\} \(dict\)"),
        (lambda: QLoRAPrecision(config=LoRAConfig()), r"QLoRAPrecision config must be a QuantizationConfig"),
    ],
)
def test_unknown_keywords_and_wrong_config_types_are_one_clear_error(make: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alpha": math.inf}, ValueError, "LoRA alpha must be a finite positive number, got inf"),
        ({"alpha": math.nan}, ValueError, "LoRA alpha must be a finite positive number, got nan"),
        ({"alpha": "16"}, TypeError, r"LoRA alpha must be a positive number, got '16' \(str\)"),
        ({"alpha_pattern": {"q": math.inf}}, ValueError, r"alpha_pattern\['q'\] must be a finite"),
        ({"dropout": math.inf}, ValueError, "LoRA dropout must be a finite number, got inf"),
        ({"dropout": math.nan}, ValueError, "LoRA dropout must be a finite number, got nan"),
        ({"dropout": "0.1"}, TypeError, r"LoRA dropout must be a number, got '0.1' \(str\)"),
        ({"dropout": True}, TypeError, r"LoRA dropout must be a number, got True \(bool\)"),
        ({"r": True}, TypeError, r"LoRA r must be a positive integer, got True \(bool\)"),
        ({"r": 8.0}, TypeError, r"LoRA r must be a positive integer, got 8.0 \(float\)"),
        ({"rank_pattern": {"q": 2.0}}, TypeError, r"rank_pattern\['q'\] must be a positive integer"),
        ({"use_rslora": "no"}, TypeError, r"LoRA use_rslora must be True or False, got 'no' \(str\)"),
        ({"use_rslora": 1}, TypeError, r"LoRA use_rslora must be True or False, got 1 \(int\)"),
        ({"target_modules": ["q_proj", 3]}, TypeError, r"LoRA target_modules must hold strings only, got 3"),
        ({"exclude": 5}, TypeError, r"LoRA exclude must be a string or a list of strings, got 5 \(int\)"),
        ({"rank_pattern": ["q"]}, TypeError, r"LoRA rank_pattern must be a mapping, got \['q'\]"),
        ({"adapter_dtype": "float64"}, ValueError, "Unknown adapter_dtype 'float64'; allowed: float32"),
        ({"adapter_only_checkpoints": "yes"}, TypeError, "adapter_only_checkpoints must be True or False"),
        ({"export_dir": 5}, TypeError, "LoRA export_dir must be a path or None, got 5"),
        ({"export_module": 1}, TypeError, "LoRA export_module must be an attribute name"),
    ],
)
def test_bad_lora_settings(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        LoRA(**kwargs)


def test_adapter_dtypes_are_the_floating_names() -> None:
    assert "auto" not in ADAPTER_DTYPES
    assert {"float32", "bfloat16", "float16"} <= set(ADAPTER_DTYPES)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"double_quant": "no"}, TypeError, r"QLoRAPrecision double_quant must be True or False, got 'no'"),
        ({"double_quant": 0}, TypeError, "double_quant must be True or False, got 0"),
        ({"blocksize": 64.0}, TypeError, r"QLoRAPrecision blocksize must be an integer, got 64.0 \(float\)"),
        ({"blocksize": True}, TypeError, r"blocksize must be an integer, got True \(bool\)"),
        ({"compute_dtype": torch.float64}, ValueError, r"Unsupported compute_dtype torch.float64"),
        ({"compute_dtype": 16.0}, ValueError, r"Unknown compute_dtype 16.0; allowed: auto"),
        ({"quant_type": "NF4"}, ValueError, "Unknown quant_type 'NF4'; allowed: nf4, fp4"),
        (
            {"exclude": ["lm_head", None]},
            TypeError,
            "QLoRAPrecision exclude must hold strings only, got None",
        ),
        ({"log_report": "yes"}, TypeError, "QLoRAPrecision log_report must be True or False, got 'yes'"),
        ({"limit_cpu_heap": 1}, TypeError, "QLoRAPrecision limit_cpu_heap must be True or False, got 1"),
    ],
)
def test_bad_quantization_settings(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        QLoRAPrecision(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": math.inf}, "Optimizer lr must be a finite number, got inf"),
        ({"lr": math.nan}, "Optimizer lr must be a finite number, got nan"),
        ({"eps": math.inf}, "Optimizer eps must be a finite number, got inf"),
        ({"weight_decay": math.inf}, "Optimizer weight_decay must be a finite number, got inf"),
        ({"weight_decay": math.nan}, "Optimizer weight_decay must be a finite number"),
        ({"betas": (0.9, math.nan)}, "Optimizer betas must be a finite number, got nan"),
        ({"betas": 0.9}, r"Optimizer betas must be two numbers in \[0, 1\), got 0.9"),
        ({"betas": ("0.9", 0.99)}, r"Optimizer betas must be two numbers"),
        ({"warmup_ratio": math.nan}, "Optimizer warmup_ratio must be a finite number"),
        ({"name": ["adamw"]}, r"Unknown optimizer \['adamw'\]"),
        ({"kwargs": ["amsgrad"]}, r"Optimizer kwargs must be a mapping, got \['amsgrad'\]"),
    ],
)
def test_bad_optimizer_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


def test_a_rank_larger_than_the_layer_is_refused_before_any_allocation() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(
        ValueError, match=r"LoRA rank too large for 2 layer\(s\): '0' \(32 -> 64\): r=1000000000"
    ):
        inject_adapters(model, LoRAConfig(r=10**9, exclude=()))
    assert not list(adapter_modules(model))  # nothing was wrapped
    with pytest.raises(ValueError, match=r"'2' \(64 -> 8\): r=100"):
        inject_adapters(model, LoRAConfig(r=8, rank_pattern={"2": 100}, exclude=()))
    # up to the larger side is allowed (a rank past the smaller side is wasteful, not wrong)
    assert inject_adapters(model, LoRAConfig(r=64, exclude=())) == ["0", "2"]


def test_export_dir_takes_a_path(tmp_path: Path) -> None:
    assert LoRA(export_dir=tmp_path).export_dir == tmp_path
    assert LoRA(export_dir=str(tmp_path)).export_dir == tmp_path
