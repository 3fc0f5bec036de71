"""4-bit storage of frozen base weights: conversion, loading, state dicts and reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_qlora._lazy import lazy_exports

# public name -> the module that defines it (imported on first use, PEP 562)
_EXPORTS: dict[str, str] = {
    "QuantizationBackend": "lightning_qlora.quantization.backends",
    "backend_names": "lightning_qlora.quantization.backends",
    "get_backend": "lightning_qlora.quantization.backends",
    "register_backend": "lightning_qlora.quantization.backends",
    "unregister_backend": "lightning_qlora.quantization.backends",
    "resolve_compute_dtype": "lightning_qlora.quantization.compute_dtype",
    "BLOCKSIZES": "lightning_qlora.quantization.config",
    "QUANT_TYPES": "lightning_qlora.quantization.config",
    "QuantizationConfig": "lightning_qlora.quantization.config",
    "NoLinearLayersError": "lightning_qlora.quantization.convert",
    "iter_linear_layers": "lightning_qlora.quantization.convert",
    "replace_linear_layers": "lightning_qlora.quantization.convert",
    "set_compute_dtype": "lightning_qlora.quantization.convert",
    "dequantize_weight": "lightning_qlora.quantization.layers",
    "is_linear4bit": "lightning_qlora.quantization.layers",
    "is_quantized": "lightning_qlora.quantization.layers",
    "load_quantized": "lightning_qlora.quantization.loading",
    "QuantizationReport": "lightning_qlora.quantization.report",
    "quantization_report": "lightning_qlora.quantization.report",
}

if TYPE_CHECKING:
    from lightning_qlora.quantization.backends import (
        QuantizationBackend,
        backend_names,
        get_backend,
        register_backend,
        unregister_backend,
    )
    from lightning_qlora.quantization.compute_dtype import resolve_compute_dtype
    from lightning_qlora.quantization.config import BLOCKSIZES, QUANT_TYPES, QuantizationConfig
    from lightning_qlora.quantization.convert import (
        NoLinearLayersError,
        iter_linear_layers,
        replace_linear_layers,
        set_compute_dtype,
    )
    from lightning_qlora.quantization.layers import dequantize_weight, is_linear4bit, is_quantized
    from lightning_qlora.quantization.loading import load_quantized
    from lightning_qlora.quantization.report import QuantizationReport, quantization_report


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "NoLinearLayersError",
    "QuantizationBackend",
    "QuantizationConfig",
    "QuantizationReport",
    "backend_names",
    "dequantize_weight",
    "get_backend",
    "is_linear4bit",
    "is_quantized",
    "iter_linear_layers",
    "load_quantized",
    "quantization_report",
    "register_backend",
    "replace_linear_layers",
    "resolve_compute_dtype",
    "set_compute_dtype",
    "unregister_backend",
]
