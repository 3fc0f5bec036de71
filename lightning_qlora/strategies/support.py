"""Which Lightning strategies the package supports, and the error for the others (FSDP, DeepSpeed, ...).

A sharded strategy would wrap or flatten the 4-bit weights and the adapters in ways the plugin, the
callback and the PEFT export do not handle yet; failing at setup, before any work, beats a run that
trains something else than it seems to.
"""

from __future__ import annotations

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)

# Lightning's single-process and data-parallel strategies (their subclasses included: the package's own
# "qlora" and "qlora_ddp", Lightning's "ddp", "ddp_spawn", "single_device").
SUPPORTED_STRATEGIES: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy)
# Sharded strategies; DeepSpeed subclasses DDPStrategy, hence the explicit list.
UNSUPPORTED_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
SUPPORTED_NAMES = (
    "QLoRAStrategy ('qlora'), QLoRADDPStrategy ('qlora_ddp'), or Lightning's single-device and DDP"
)


class UnsupportedStrategyError(ValueError):
    """A strategy lightning-qlora does not support yet (FSDP, DeepSpeed, model parallel)."""


def require_supported_strategy(strategy: Strategy, user: str) -> None:
    """Raise `UnsupportedStrategyError` naming the supported strategies unless `strategy` is one of them."""
    if isinstance(strategy, SUPPORTED_STRATEGIES) and not isinstance(strategy, UNSUPPORTED_STRATEGIES):
        return
    raise UnsupportedStrategyError(
        f"{user} does not support {type(strategy).__name__} yet (sharded strategies such as FSDP, DeepSpeed "
        "or model parallelism would split the 4-bit weights and adapters in ways lightning-qlora does not "
        f"handle). Use {SUPPORTED_NAMES} strategies: Trainer(strategy='qlora') on one device, "
        "strategy='qlora_ddp' on several."
    )
