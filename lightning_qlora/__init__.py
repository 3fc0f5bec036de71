"""lightning-qlora: QLoRA fine-tuning as a native part of PyTorch Lightning.

`Trainer(plugins=[QLoRAPrecision()], callbacks=[LoRA()], strategy=QLoRAStrategy())`

The public names are imported on first use (PEP 562): `import lightning_qlora` alone does not import torch
or Lightning, so the training command answers `--help`, `--version` and `--cfg job` at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_qlora._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "LoRA": "lightning_qlora.lora",
    "LoRAConfig": "lightning_qlora.lora",
    "LoRALinear": "lightning_qlora.lora",
    "DoRALinear": "lightning_qlora.lora",
    "load_peft_adapter": "lightning_qlora.lora",
    "merge_adapters": "lightning_qlora.lora",
    "save_merged": "lightning_qlora.lora",
    "save_peft_adapter": "lightning_qlora.lora",
    "QLoRAPrecision": "lightning_qlora.precision",
    "QuantizationConfig": "lightning_qlora.quantization",
    "QuantizationReport": "lightning_qlora.quantization",
    "load_quantized": "lightning_qlora.quantization",
    "quantization_report": "lightning_qlora.quantization",
    "OptimizerConfig": "lightning_qlora.strategies",
    "QLoRADDPStrategy": "lightning_qlora.strategies",
    "QLoRAFSDPStrategy": "lightning_qlora.strategies",
    "QLoRAStrategy": "lightning_qlora.strategies",
}

if TYPE_CHECKING:
    from lightning_qlora.lora import (
        DoRALinear,
        LoRA,
        LoRAConfig,
        LoRALinear,
        load_peft_adapter,
        merge_adapters,
        save_merged,
        save_peft_adapter,
    )
    from lightning_qlora.precision import QLoRAPrecision
    from lightning_qlora.quantization import (
        QuantizationConfig,
        QuantizationReport,
        load_quantized,
        quantization_report,
    )
    from lightning_qlora.strategies import (
        OptimizerConfig,
        QLoRADDPStrategy,
        QLoRAFSDPStrategy,
        QLoRAStrategy,
    )


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


__all__ = [
    "DoRALinear",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "OptimizerConfig",
    "QLoRADDPStrategy",
    "QLoRAFSDPStrategy",
    "QLoRAPrecision",
    "QLoRAStrategy",
    "QuantizationConfig",
    "QuantizationReport",
    "__version__",
    "load_peft_adapter",
    "load_quantized",
    "merge_adapters",
    "quantization_report",
    "save_merged",
    "save_peft_adapter",
]
