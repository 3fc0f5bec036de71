"""lightning-qlora: QLoRA fine-tuning as a native part of PyTorch Lightning.

`Trainer(plugins=[QLoRAPrecision()], callbacks=[LoRA()], strategy=QLoRAStrategy())`
"""

from lightning_qlora.lora import LoRA, LoRAConfig, LoRALinear
from lightning_qlora.precision import QLoRAPrecision
from lightning_qlora.quantization import (
    QuantizationConfig,
    QuantizationReport,
    load_quantized,
    quantization_report,
)

__version__ = "0.1.0"

__all__ = [
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "QLoRAPrecision",
    "QuantizationConfig",
    "QuantizationReport",
    "__version__",
    "load_quantized",
    "quantization_report",
]
