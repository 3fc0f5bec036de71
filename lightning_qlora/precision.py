"""`QLoRAPrecision`: the Lightning Precision plugin that stores the frozen base in 4-bit NF4."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_qlora._logging import rank_zero_info
from lightning_qlora.quantization.backends import DEFAULT_BACKEND, get_backend
from lightning_qlora.quantization.compute_dtype import resolve_compute_dtype
from lightning_qlora.quantization.config import DEFAULT_EXCLUDE, QuantizationConfig
from lightning_qlora.quantization.convert import replace_linear_layers, set_compute_dtype
from lightning_qlora.quantization.layers import is_linear4bit, quantize_layer
from lightning_qlora.quantization.report import QuantizationReport, quantization_report


class QLoRAPrecision(Precision):
    """Quantize every linear layer of the model to 4-bit (NF4 + double quantization by default) at setup.

    Unlike Lightning's `BitsandbytesPrecision` this runs on CPU as well as CUDA, leaves LoRA adapters and
    `modules_to_save` untouched, and loads its own state dicts back. Weights that already sit on an
    accelerator are quantized in `convert_module`; weights on the CPU are quantized when the strategy moves
    the model to its device, so a CPU-built model that trains on CUDA is quantized on CUDA and never exists
    there in full precision.

    Args:
        quant_type: "nf4" (the paper's NormalFloat) or "fp4".
        blocksize: weights per absmax constant (64 in the paper).
        double_quant: also quantize the absmax constants (4.127 instead of 4.5 bits per parameter).
        compute_dtype: dtype of the dequantized matmul. "auto": bf16 on CUDA with bf16 support, else fp16;
            on CPU bf16 only where it is native (AVX512-BF16/AMX), else fp32.
        exclude: module-name patterns (glob or dotted suffix) kept in full precision. `lm_head` by default.
        log_report: log a table of what was quantized at setup (rank 0 only).
        backend: the 4-bit storage backend ("bitsandbytes", or a name given to `register_backend`).
    """

    # The parts that are not quantized (adapters, norms, embeddings) train in full precision.
    precision = "32-true"

    def __init__(
        self,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: str | torch.dtype = "auto",
        exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
        log_report: bool = True,
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        self.config = QuantizationConfig(
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude or ()),
            backend=backend,
        )
        get_backend(self.config.backend)  # a missing library fails here, with the fix, before any work
        self.log_report = log_report
        self.report: QuantizationReport | None = None
        self.compute_dtype: torch.dtype | None = None

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        device = _accelerator_device(module)
        compute_dtype = None
        if device is not None:
            compute_dtype = resolve_compute_dtype(self.config.compute_dtype, device)
        replace_linear_layers(
            module, self.config, compute_dtype=compute_dtype, device=device, quantize_now=device is not None
        )
        return module

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Runs after the model reached its device: finish quantizing, fix the compute dtype, report."""
        layers = [m for m in model.modules() if isinstance(m, nn.Linear) and is_linear4bit(m)]
        for layer in layers:
            quantize_layer(layer)
        if layers:
            self.compute_dtype = resolve_compute_dtype(self.config.compute_dtype, layers[0].weight.device)
            set_compute_dtype(model, self.compute_dtype)
        self.report = quantization_report(model)
        if self.log_report:
            rank_zero_info(
                f"QLoRAPrecision: {self.config.quant_type.upper()}"
                f"{' + double quantization' if self.config.double_quant else ''}, blocksize "
                f"{self.config.blocksize}, compute dtype {str(self.compute_dtype).removeprefix('torch.')}\n"
                + self.report.table()
            )
        return super().connect(model, optimizers, lr_schedulers)


def _accelerator_device(module: nn.Module) -> torch.device | None:
    """The accelerator the linear weights already live on (a model built in `configure_model`), if any."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and sub.weight.device.type not in ("cpu", "meta"):
            device: torch.device = sub.weight.device
            return device
    return None
