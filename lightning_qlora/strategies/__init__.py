"""Strategies that install the QLoRA optimizer recipe; importing this registers "qlora", "qlora_ddp" and
"qlora_fsdp"."""

from __future__ import annotations

from lightning.pytorch.strategies import StrategyRegistry

from lightning_qlora.strategies.ddp import QLoRADDPStrategy
from lightning_qlora.strategies.fsdp import QLoRAFSDPStrategy
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
    QLoRAFSDPStrategy.register_strategies(StrategyRegistry)


register_strategies()

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "NoTrainableParametersError",
    "OptimizerConfig",
    "QLoRADDPStrategy",
    "QLoRAFSDPStrategy",
    "QLoRAStrategy",
    "WarmupSchedule",
    "build_optimizer",
    "build_scheduler",
    "register_strategies",
]
