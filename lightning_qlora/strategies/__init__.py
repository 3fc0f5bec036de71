"""Strategies that install the QLoRA optimizer recipe; importing this registers "qlora" and "qlora_ddp"."""

from __future__ import annotations

from lightning.pytorch.strategies import StrategyRegistry

from lightning_qlora.strategies.ddp import QLoRADDPStrategy
from lightning_qlora.strategies.hook import NoTrainableParametersError
from lightning_qlora.strategies.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    OptimizerConfig,
    WarmupSchedule,
    build_optimizer,
    build_scheduler,
)
from lightning_qlora.strategies.single import QLoRAStrategy


def register_strategies() -> None:
    """Make `Trainer(strategy="qlora")` and friends resolve; a second call (or a re-import) is a no-op."""
    QLoRAStrategy.register_strategies(StrategyRegistry)
    QLoRADDPStrategy.register_strategies(StrategyRegistry)


register_strategies()

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "NoTrainableParametersError",
    "OptimizerConfig",
    "QLoRADDPStrategy",
    "QLoRAStrategy",
    "WarmupSchedule",
    "build_optimizer",
    "build_scheduler",
    "register_strategies",
]
