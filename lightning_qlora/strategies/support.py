"""Which Lightning strategies the package supports, and the error for the others (FSDP, DeepSpeed, ...).

Lightning's own sharded strategies would wrap or flatten the 4-bit weights and the adapters in ways the
plugin, the callback and the PEFT export do not handle (FSDP1 value-casts packed bytes and drops the quant
state, DeepSpeed flattens them); the package's `QLoRAFSDPStrategy` ("qlora_fsdp") shards them byte-exact.
Failing at setup, before any work, beats a run that trains something else than it seems to.
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
    "QLoRAStrategy ('qlora'), QLoRADDPStrategy ('qlora_ddp'), QLoRAFSDPStrategy ('qlora_fsdp'), or "
    "Lightning's single-device and DDP"
)
# Set to True on a strategy class that shards the 4-bit weights itself (QLoRAFSDPStrategy).
SHARDS_4BIT_ATTR = "shards_4bit_weights"


class UnsupportedStrategyError(ValueError):
    """A strategy lightning-qlora does not support yet (FSDP, DeepSpeed, model parallel)."""


def require_supported_strategy(strategy: Strategy, user: str) -> None:
    """Raise `UnsupportedStrategyError` naming the supported strategies unless `strategy` is one of them."""
    if getattr(type(strategy), SHARDS_4BIT_ATTR, False):
        return
    if isinstance(strategy, SUPPORTED_STRATEGIES) and not isinstance(strategy, UNSUPPORTED_STRATEGIES):
        return
    raise UnsupportedStrategyError(
        f"{user} does not support {type(strategy).__name__} (Lightning's FSDP, DeepSpeed and model-parallel "
        "strategies would cast, flatten or drop the packed 4-bit weights and their quant state). Use "
        f"{SUPPORTED_NAMES} strategies: Trainer(strategy='qlora') on one device, strategy='qlora_ddp' to "
        "copy the model to several, strategy='qlora_fsdp' to shard it across them (FSDP2)."
    )
