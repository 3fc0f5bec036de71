"""4-bit storage of frozen base weights: conversion, loading, state dicts and reports."""

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
