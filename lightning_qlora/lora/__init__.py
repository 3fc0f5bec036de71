"""LoRA adapters: the layer, where they go, the Callback, and PEFT-format files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_qlora._lazy import lazy_exports

# public name -> the module that defines it (imported on first use, PEP 562)
_EXPORTS: dict[str, str] = {
    "AdapterModule": "lightning_qlora.lora.adapter",
    "adapter_modules": "lightning_qlora.lora.adapter",
    "adapter_params": "lightning_qlora.lora.adapter",
    "is_adapter": "lightning_qlora.lora.adapter",
    "set_trainable_params": "lightning_qlora.lora.adapter",
    "LoRA": "lightning_qlora.lora.callback",
    "LoRAConfig": "lightning_qlora.lora.config",
    "DoRALinear": "lightning_qlora.lora.dora",
    "AdapterSummary": "lightning_qlora.lora.inject",
    "PatternMatchError": "lightning_qlora.lora.inject",
    "inject_adapters": "lightning_qlora.lora.inject",
    "summarize": "lightning_qlora.lora.inject",
    "LoRALinear": "lightning_qlora.lora.layer",
    "LoftQInit": "lightning_qlora.lora.loftq",
    "loftq_init": "lightning_qlora.lora.loftq",
    "save_loftq_base": "lightning_qlora.lora.loftq",
    "merge_adapters": "lightning_qlora.lora.merge",
    "merge_in_place": "lightning_qlora.lora.merge",
    "merged_state_dict": "lightning_qlora.lora.merge",
    "save_merged": "lightning_qlora.lora.merge",
    "unmerge_in_place": "lightning_qlora.lora.merge",
    "AdapterMismatchError": "lightning_qlora.lora.peft_format",
    "AdapterVariant": "lightning_qlora.lora.variants",
    "ExtraTensor": "lightning_qlora.lora.variants",
    "UnknownVariantError": "lightning_qlora.lora.variants",
    "get_variant": "lightning_qlora.lora.variants",
    "register_variant": "lightning_qlora.lora.variants",
    "unregister_variant": "lightning_qlora.lora.variants",
    "variant_names": "lightning_qlora.lora.variants",
    "EXPORT_MARKER": "lightning_qlora._export_dir",
    "ExportDirError": "lightning_qlora._export_dir",
    "load_peft_adapter": "lightning_qlora.lora.peft_format",
    "save_peft_adapter": "lightning_qlora.lora.peft_format",
}

if TYPE_CHECKING:
    from lightning_qlora._export_dir import EXPORT_MARKER, ExportDirError
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
        inject_adapters,
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
    from lightning_qlora.lora.variants import (
        AdapterVariant,
        ExtraTensor,
        UnknownVariantError,
        get_variant,
        register_variant,
        unregister_variant,
        variant_names,
    )


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


__all__ = [
    "EXPORT_MARKER",
    "AdapterMismatchError",
    "AdapterModule",
    "AdapterSummary",
    "AdapterVariant",
    "DoRALinear",
    "ExportDirError",
    "ExtraTensor",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "LoftQInit",
    "PatternMatchError",
    "UnknownVariantError",
    "adapter_modules",
    "adapter_params",
    "get_variant",
    "inject_adapters",
    "is_adapter",
    "load_peft_adapter",
    "loftq_init",
    "merge_adapters",
    "merge_in_place",
    "merged_state_dict",
    "register_variant",
    "save_loftq_base",
    "save_merged",
    "save_peft_adapter",
    "set_trainable_params",
    "summarize",
    "unmerge_in_place",
    "unregister_variant",
    "variant_names",
]
