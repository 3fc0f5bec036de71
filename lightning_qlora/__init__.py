"""lightning-qlora: QLoRA fine-tuning as a native part of PyTorch Lightning.

`Trainer(plugins=[QLoRAPrecision()], callbacks=[LoRA()], strategy=QLoRAStrategy())`
"""

from lightning_qlora.lora import (
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
from lightning_qlora.strategies import OptimizerConfig, QLoRADDPStrategy, QLoRAStrategy

__version__ = "0.1.0"

__all__ = [
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "OptimizerConfig",
    "QLoRADDPStrategy",
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
