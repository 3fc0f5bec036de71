"""LoRA adapters: the layer, where they go, the Callback, and PEFT-format files."""

from lightning_qlora.lora.callback import LoRA
from lightning_qlora.lora.config import LoRAConfig
from lightning_qlora.lora.inject import (
    AdapterSummary,
    PatternMatchError,
    adapter_layers,
    adapter_parameters,
    inject_adapters,
    set_trainable,
    summarize,
)
from lightning_qlora.lora.layer import LoRALinear

__all__ = [
    "AdapterSummary",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "PatternMatchError",
    "adapter_layers",
    "adapter_parameters",
    "inject_adapters",
    "set_trainable",
    "summarize",
]
