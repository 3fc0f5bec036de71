"""QLoRAFSDPStrategy ("qlora_fsdp"): registration, the Hydra group, and the refusals made before any work."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry
from strategies.strategy_helpers import TinyModule
from torch.distributed.fsdp import MixedPrecisionPolicy

from lightning_qlora import QLoRAFSDPStrategy
from lightning_qlora.cli import conf_dir
from lightning_qlora.cli.job import build_strategy
from lightning_qlora.strategies.fsdp import _check_storage
from lightning_qlora.strategies.support import UnsupportedStrategyError, require_supported_strategy


def test_registered_by_name_and_built_by_the_trainer() -> None:
    assert "qlora_fsdp" in StrategyRegistry
    trainer = Trainer(accelerator="cpu", devices=2, strategy="qlora_fsdp", logger=False, max_steps=1)
    strategy = trainer.strategy
    assert isinstance(strategy, QLoRAFSDPStrategy)
    assert isinstance(strategy, ModelParallelStrategy)  # Lightning's FSDP2 strategy underneath
    assert strategy.optimizer_config.name == "paged_adamw"
    assert strategy.max_grad_norm == 0.3
    require_supported_strategy(strategy, "QLoRAPrecision")
    require_supported_strategy(strategy, "LoRA")


@pytest.mark.parametrize("user", ["LoRA", "QLoRAPrecision"])
def test_lightnings_fsdp_is_refused_naming_qlora_fsdp(user: str) -> None:
    with pytest.raises(UnsupportedStrategyError, match="strategy='qlora_fsdp'"):
        require_supported_strategy(FSDPStrategy(), user)
    with pytest.raises(UnsupportedStrategyError, match="QLoRAFSDPStrategy"):
        require_supported_strategy(ModelParallelStrategy(), user)


def test_hydra_trainer_fsdp_builds_the_strategy(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "trainer=fsdp"])
    strategy = build_strategy(cfg.trainer.strategy, instantiate(cfg.optimizer))
    assert isinstance(strategy, QLoRAFSDPStrategy)
    assert strategy.reshard_after_forward is True
    assert strategy.shard is None
    assert cfg.trainer.num_nodes == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor_parallel_size": 2}, r"tensor_parallel_size=2.*allowed: 1"),
        ({"data_parallel_size": 0}, r"data_parallel_size=0.*'auto' or an int >= 1"),
        ({"cpu_offload": True}, r"cpu_offload=True\) is not supported"),
        (
            {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)},
            r"param_dtype=torch.bfloat16.*packed 4-bit weights",
        ),
        ({"shard": [3]}, r"takes module classes or class names"),
        ({"reshard_after_forward": "yes"}, r"reshard_after_forward"),
    ],
    ids=[
        "tensor_parallel",
        "data_parallel_0",
        "cpu_offload",
        "bf16_param_dtype",
        "shard_type",
        "reshard_type",
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        QLoRAFSDPStrategy(**kwargs)


def test_mixed_precision_without_param_dtype_is_accepted() -> None:
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    assert QLoRAFSDPStrategy(mp_policy=policy).mp_policy is policy


def test_8bit_optimizer_states_are_refused_before_the_optimizer_is_built() -> None:
    strategy = QLoRAFSDPStrategy(name="paged_adamw_8bit")
    with pytest.raises(ValueError, match=r"'paged_adamw_8bit'.*allowed with qlora_fsdp: paged_adamw"):
        strategy._build_optimizer(None, TinyModule())  # type: ignore[arg-type]


def test_4bit_storage_other_than_uint8_is_refused() -> None:
    layer = bnb.nn.Linear4bit(64, 64, quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(64, 64), requires_grad=False, quant_storage=torch.bfloat16, module=layer
    )._quantize("cpu")
    model = torch.nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"'0' is stored as torch.bfloat16.*torch.uint8"):
        _check_storage(model, "QLoRAFSDPStrategy")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_embeddings_and_head_are_units_of_their_own_unless_tied(tied: bool) -> None:
    from tiny_models import tiny_llama

    from lightning_qlora.strategies.fsdp import _full_precision_leaves, _root_units

    model = tiny_llama(tie_word_embeddings=tied)
    layers = list(model.model.layers)
    leaves = _full_precision_leaves(model, layers)
    expected = [] if tied else [model.model.embed_tokens, model.lm_head]
    assert [id(m) for m in leaves] == [id(m) for m in expected]
    holder = torch.nn.Module()
    holder.model = model
    roots = _root_units(holder, [*layers, *leaves])
    assert roots == [model]  # the norm (and, tied, the shared embedding) stay in the root unit
