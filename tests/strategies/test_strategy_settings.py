"""Strategy settings from keywords and checked, supported strategies, restores on every exit path."""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from omegaconf import OmegaConf
from strategies.strategy_helpers import Block, TinyModule, dataloader, trainer

from lightning_qlora import OptimizerConfig, QLoRADDPStrategy, QLoRAStrategy
from lightning_qlora.cli.resolvers import register_resolvers
from lightning_qlora.optimizer_config import StrategySettings
from lightning_qlora.strategies.hook import _CPU_PAGING_WARNING
from lightning_qlora.strategies.support import UnsupportedStrategyError, require_supported_strategy


def test_optimizer_settings_as_keywords() -> None:
    """`QLoRAStrategy(lr=1e-3)` builds OptimizerConfig(lr=1e-3); the other fields keep its defaults."""
    assert QLoRAStrategy(lr=1e-3).optimizer_config == OptimizerConfig(lr=1e-3)
    assert QLoRADDPStrategy(lr=1e-3, scheduler="cosine").optimizer_config == OptimizerConfig(
        lr=1e-3, scheduler="cosine"
    )
    # keywords replace fields of a given config
    base = OptimizerConfig(name="adamw", weight_decay=0.01)
    assert QLoRAStrategy(optimizer=base, lr=5e-4).optimizer_config == OptimizerConfig(
        name="adamw", weight_decay=0.01, lr=5e-4
    )
    # DDP's own keywords still reach DistributedDataParallel
    ddp = QLoRADDPStrategy(lr=1e-3, gradient_as_bucket_view=True)
    assert ddp.optimizer_config.lr == 1e-3
    assert ddp._ddp_kwargs["gradient_as_bucket_view"] is True


def test_strategy_defaults_have_one_source() -> None:
    """`StrategySettings` gives the strategies' defaults and the trainer configs' (which only interpolate)."""
    defaults = StrategySettings()
    for cls in (QLoRAStrategy, QLoRADDPStrategy):
        parameters = inspect.signature(cls.__init__).parameters
        for field in fields(StrategySettings):
            assert parameters[field.name].default == getattr(defaults, field.name), (cls, field.name)
    register_resolvers()
    conf = Path(__file__).resolve().parents[2] / "conf" / "trainer"
    checked = 0
    for path in sorted(conf.glob("*.yaml")):
        strategy = OmegaConf.load(path).get("strategy")
        if OmegaConf.is_dict(strategy) and "max_grad_norm" in strategy:
            assert strategy.max_grad_norm == defaults.max_grad_norm, path.name
            checked += 1
    assert checked >= 3  # cpu, gpu, ddp


def test_unknown_keyword_names_the_allowed_ones() -> None:
    with pytest.raises(
        TypeError, match=r"QLoRAStrategy got unexpected argument\(s\) \['learning_rate'\]"
    ) as err:
        QLoRAStrategy(learning_rate=1e-3)
    for allowed in ("optimizer", "max_grad_norm", "lr", "weight_decay", "warmup_ratio"):
        assert allowed in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_grad_norm": math.inf}, ValueError, "max_grad_norm must be a finite number"),
        ({"max_grad_norm": math.nan}, ValueError, "max_grad_norm must be a finite number"),
        ({"max_grad_norm": 0.0}, ValueError, r"max_grad_norm must be > 0"),
        ({"max_grad_norm": "0.3"}, TypeError, "max_grad_norm must be a number, got '0.3'"),
        ({"force_optimizer": "yes"}, TypeError, "force_optimizer must be True or False, got 'yes'"),
        ({"lr": math.inf}, ValueError, "Optimizer lr must be a finite number, got inf"),
        ({"optimizer": {"eps": math.nan}}, ValueError, "Optimizer eps must be a finite number"),
    ],
)
def test_strategy_settings_are_checked(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        QLoRAStrategy(**kwargs)


@pytest.mark.parametrize("key", ["find_unused_parameters", "broadcast_buffers"])
def test_ddp_flags_are_bools(key: str) -> None:
    with pytest.raises(TypeError, match=rf"QLoRADDPStrategy {key} must be True or False, got 'no'"):
        QLoRADDPStrategy(**{key: "no"})


def _deepspeed_strategy() -> DeepSpeedStrategy:
    """Lightning's DeepSpeedStrategy refuses to construct without the deepspeed package (not a dependency
    here); an instance of the real class, uninitialised, is what the isinstance-based check sees."""
    try:
        return DeepSpeedStrategy()
    except Exception:
        return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


@pytest.mark.parametrize(
    "make",
    [FSDPStrategy, ModelParallelStrategy, _deepspeed_strategy],
    ids=["fsdp", "model_parallel", "deepspeed"],
)
@pytest.mark.parametrize("user", ["LoRA", "QLoRAPrecision"])
def test_sharded_strategies_are_refused_naming_the_supported_ones(make: Any, user: str) -> None:
    strategy = make()
    with pytest.raises(
        UnsupportedStrategyError, match=rf"{user} does not support {type(strategy).__name__}"
    ) as err:
        require_supported_strategy(strategy, user)
    assert "QLoRAStrategy ('qlora')" in str(err.value)
    assert "QLoRADDPStrategy ('qlora_ddp')" in str(err.value)


@pytest.mark.parametrize(
    "strategy",
    [QLoRAStrategy(), QLoRADDPStrategy(), DDPStrategy(), SingleDeviceStrategy("cpu")],
    ids=["qlora", "qlora_ddp", "ddp", "single_device"],
)
def test_supported_strategies_pass(strategy: Any) -> None:
    require_supported_strategy(strategy, "LoRA")


class _FailAt(Callback):
    """Raise in the second training step, after the optimizer took its first step; keep what fit patched."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.patched: set[str] = set()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        self.optimizer = trainer.strategy.optimizers[0]
        self.patched |= set(vars(pl_module)) & {"configure_model", "configure_optimizers"}
        self.patched |= {"forward" for m in pl_module.modules() if "forward" in vars(m)}
        if i == 1:
            raise RuntimeError("boom in step 2")


class BuiltInConfigureModel(TinyModule):
    """The model is built in configure_model, so the LoRA callback patches configure_model."""

    def __init__(self) -> None:
        super().__init__(blocks=1)
        self._blocks = self.model
        del self.model

    def configure_model(self) -> None:
        if not hasattr(self, "model"):
            self.model = self._blocks


def _paging_filters() -> list[Any]:
    return [f for f in warnings.filters if f[1] is not None and _CPU_PAGING_WARNING in f[1].pattern]


def test_a_fit_that_raises_leaves_module_and_optimizer_unpatched() -> None:
    module = BuiltInConfigureModel()
    fail = _FailAt()
    fit = trainer(QLoRAStrategy(activation_checkpointing=Block), max_steps=5, callbacks=[fail])
    filters_before = _paging_filters()
    with pytest.raises(RuntimeError, match="boom in step 2"):
        fit.fit(module, dataloader())
    # during fit all three were patched: the check below is not vacuous
    assert fail.patched == {"configure_model", "configure_optimizers", "forward"}
    assert "configure_model" not in vars(module)  # LoRA restored it in on_exception
    assert "configure_optimizers" not in vars(module)  # the strategy's stand-in is gone
    assert not [name for name, m in module.named_modules() if "forward" in vars(m)]  # no checkpointing
    assert fail.optimizer is not None
    assert "step" not in vars(fail.optimizer)  # the step was never rebound
    assert _paging_filters() == filters_before  # the warning filter was scoped to the step
    # and the module trains again in a new Trainer, as it came in
    fit = trainer(QLoRAStrategy(), max_steps=1)
    fit.fit(module, dataloader())
    assert "configure_model" not in vars(module)


def test_lora_restore_is_idempotent() -> None:
    from lightning_qlora import LoRA

    module = BuiltInConfigureModel()
    lora = LoRA(r=2)
    lora._inject_after_configure_model(module)
    assert "configure_model" in vars(module)
    lora.on_exception(None, module, RuntimeError())  # type: ignore[arg-type]
    lora.on_exception(None, module, RuntimeError())  # type: ignore[arg-type]
    lora.teardown(None, module, "fit")  # type: ignore[arg-type]
    assert "configure_model" not in vars(module)


def test_the_paging_warning_is_silenced_where_it_is_raised() -> None:
    """No warning escapes fit, yet bitsandbytes' own optimizer outside the strategy still warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(QLoRAStrategy(), max_steps=2)
        fit.fit(TinyModule(), dataloader())
    assert not [w for w in caught if "Paged optimizers" in str(w.message)]
    assert "step" not in vars(fit.optimizers[0])
