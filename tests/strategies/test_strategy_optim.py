"""OptimizerConfig, build_optimizer and build_scheduler, without a Trainer."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch

from lightning_qlora import OptimizerConfig, QLoRADDPStrategy, QLoRAStrategy
from lightning_qlora.strategies import OPTIMIZERS, WarmupSchedule, build_optimizer, build_scheduler


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.zeros(8))]


def test_defaults_are_the_papers() -> None:
    config = OptimizerConfig()
    assert config.name == "paged_adamw"
    assert config.optimizer_class is bnb.optim.PagedAdamW32bit
    assert (config.lr, config.betas, config.eps, config.weight_decay) == (2e-4, (0.9, 0.999), 1e-8, 0.0)
    assert config.scheduler == "constant"
    assert config.warmup_steps is None
    assert config.warmup_ratio is None
    for strategy in (QLoRAStrategy(), QLoRADDPStrategy()):
        assert strategy.max_grad_norm == 0.3
        assert strategy.optimizer_config == config
        assert strategy.force_optimizer is False


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("paged_adamw", bnb.optim.PagedAdamW32bit),
        ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit),
        ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
        ("adamw", torch.optim.AdamW),
    ],
)
def test_build_optimizer_class_and_hyperparameters(name: str, cls: type[torch.optim.Optimizer]) -> None:
    params = _params()
    config = OptimizerConfig(name=name, lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)
    optimizer = build_optimizer(params, config)
    assert type(optimizer) is cls
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in params]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (
        1e-3,
        (0.8, 0.95),
        1e-6,
        0.01,
    )


def test_bad_names_list_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'") as err:
        OptimizerConfig(name="adam")
    for name in OPTIMIZERS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match=r"Unknown scheduler 'step'; allowed: constant, linear, cosine"):
        OptimizerConfig(scheduler="step")


def test_optimizer_kwargs_are_checked_against_the_signature() -> None:
    assert OptimizerConfig(kwargs={"min_8bit_size": 16}).kwargs == {"min_8bit_size": 16}
    assert OptimizerConfig(name="adamw", kwargs={"amsgrad": True}).kwargs == {"amsgrad": True}
    with pytest.raises(
        ValueError, match=r"\(optimizer 'paged_adamw'\) takes no argument\(s\) \['momentum'\]"
    ) as err:
        OptimizerConfig(kwargs={"momentum": 0.9})
    assert "allowed kwargs: min_8bit_size." in str(err.value)
    with pytest.raises(
        ValueError, match=r"\(optimizer 'adamw'\) takes no argument\(s\) \['min_8bit_size'\]"
    ) as err:
        OptimizerConfig(name="adamw", kwargs={"min_8bit_size": 16})
    assert "amsgrad" in str(err.value)
    assert "fused" in str(err.value)
    with pytest.raises(ValueError, match=r"kwargs \['lr'\] have their own OptimizerConfig field"):
        OptimizerConfig(kwargs={"lr": 1.0})
    # what passes the check reaches the optimizer
    optimizer = build_optimizer(_params(), OptimizerConfig(name="adamw", kwargs={"amsgrad": True}))
    assert optimizer.param_groups[0]["amsgrad"] is True
    optimizer = build_optimizer(
        _params(), OptimizerConfig(name="paged_adamw_8bit", kwargs={"min_8bit_size": 16})
    )
    assert optimizer.args.min_8bit_size == 16


@pytest.mark.parametrize("key", ["amsgrad", "optim_bits"])
def test_arguments_bitsandbytes_would_ignore_are_rejected(key: str) -> None:
    """bitsandbytes' AdamW classes accept amsgrad and optim_bits but never pass them on."""
    with pytest.raises(
        ValueError, match=rf"PagedAdamW8bit \(optimizer 'paged_adamw_8bit'\) accepts but ignores \['{key}'\]"
    ):
        OptimizerConfig(name="paged_adamw_8bit", kwargs={key: 32 if key == "optim_bits" else True})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": 0}, "lr must be a positive number"),
        ({"betas": (0.9,)}, "betas must be two numbers"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers"),
        ({"weight_decay": -1}, "weight_decay must be a number >= 0"),
        ({"warmup_steps": 2, "warmup_ratio": 0.1}, "not both"),
        ({"warmup_steps": 1.5}, "warmup_steps must be a non-negative integer"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio must be a number in \[0, 1\)"),
    ],
)
def test_invalid_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**fields)


def test_from_mapping() -> None:
    config = OptimizerConfig.from_any({"name": "adamw", "betas": [0.9, 0.99], "scheduler": "cosine"})
    assert config == OptimizerConfig(name="adamw", betas=(0.9, 0.99), scheduler="cosine")
    assert OptimizerConfig.from_any(None) == OptimizerConfig()
    with pytest.raises(ValueError, match=r"Unknown OptimizerConfig field\(s\) \['learning_rate'\]"):
        OptimizerConfig.from_any({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="Unknown optimizer"):
        QLoRAStrategy(optimizer={"name": "sgd"})


def _lrs(config: OptimizerConfig, total: int | None, steps: int) -> list[float]:
    optimizer = build_optimizer(_params(), config)
    scheduler = build_scheduler(optimizer, config, total)
    assert scheduler is not None
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_constant_schedule_needs_no_scheduler() -> None:
    optimizer = build_optimizer(_params(), OptimizerConfig())
    assert build_scheduler(optimizer, OptimizerConfig(), None) is None
    assert build_scheduler(optimizer, OptimizerConfig(warmup_steps=0), None) is None


def test_constant_with_warmup() -> None:
    lrs = _lrs(OptimizerConfig(lr=1.0, warmup_steps=4), None, 7)
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_schedule() -> None:
    lrs = _lrs(OptimizerConfig(lr=1.0, scheduler="linear", warmup_steps=2), 10, 11)
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])


def test_cosine_schedule_with_warmup_ratio() -> None:
    # warmup_ratio 0.1 of 20 steps = 2 warmup steps, then a half cosine over 18 steps
    lrs = _lrs(OptimizerConfig(lr=2.0, scheduler="cosine", warmup_ratio=0.1), 20, 21)
    assert lrs[:3] == pytest.approx([0.0, 1.0, 2.0])
    assert lrs[11] == pytest.approx(1.0)  # halfway through the decay
    assert lrs[5] == pytest.approx(1.0 + math.cos(math.pi * 3 / 18))
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)


def test_decaying_schedule_needs_finite_steps() -> None:
    optimizer = build_optimizer(_params(), OptimizerConfig())
    for total in (None, float("inf")):
        with pytest.raises(ValueError, match="needs a finite number of training steps"):
            build_scheduler(optimizer, OptimizerConfig(scheduler="linear"), total)
    with pytest.raises(ValueError, match="with warmup_ratio needs a finite"):
        build_scheduler(optimizer, OptimizerConfig(warmup_ratio=0.1), None)


def test_schedule_state_is_plain_data() -> None:
    """LambdaLR saves the schedule's attributes: numbers and a string, loadable with weights_only."""
    optimizer = build_optimizer(_params(), OptimizerConfig())
    scheduler = build_scheduler(optimizer, OptimizerConfig(scheduler="cosine", warmup_steps=3), 30)
    assert scheduler is not None
    assert isinstance(scheduler.lr_lambdas[0], WarmupSchedule)
    assert scheduler.state_dict()["lr_lambdas"] == [{"kind": "cosine", "warmup_steps": 3, "total_steps": 30}]
