"""LoRA adapters: the layer, where they go, the Callback, and PEFT-format files."""

from lightning_qlora.lora.adapter import (
    AdapterModule,
    adapter_modules,
    adapter_params,
    is_adapter,
    set_trainable_params,
)
from lightning_qlora.lora.callback import LoRA
from lightning_qlora.lora.config import LoRAConfig
from lightning_qlora.lora.dora import DoRALinear
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
from lightning_qlora.lora.loftq import LoftQInit, loftq_init, save_loftq_base
from lightning_qlora.lora.merge import (
    merge_adapters,
    merge_in_place,
    merged_state_dict,
    save_merged,
    unmerge_in_place,
)
from lightning_qlora.lora.peft_format import AdapterMismatchError, load_peft_adapter, save_peft_adapter

__all__ = [
    "AdapterMismatchError",
    "AdapterModule",
    "AdapterSummary",
    "DoRALinear",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "LoftQInit",
    "PatternMatchError",
    "adapter_layers",
    "adapter_modules",
    "adapter_parameters",
    "adapter_params",
    "inject_adapters",
    "is_adapter",
    "load_peft_adapter",
    "loftq_init",
    "merge_adapters",
    "merge_in_place",
    "merged_state_dict",
    "save_loftq_base",
    "save_merged",
    "save_peft_adapter",
    "set_trainable",
    "set_trainable_params",
    "summarize",
    "unmerge_in_place",
]
