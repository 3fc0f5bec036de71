"""Choosing the dtype the dequantized matmul runs in, per device.

bf16 is the paper's choice and right on CUDA, but CPUs without native bf16 run bf16 matmuls two orders of
magnitude slower than fp32 (benchmarks/README.md), so "auto" picks by what the device can do.
"""

from __future__ import annotations

import torch

from lightning_qlora.quantization.backends import DEFAULT_BACKEND, get_backend
from lightning_qlora.quantization.config import torch_dtype


def cpu_has_native_bf16(backend: str = DEFAULT_BACKEND) -> bool:
    """AVX512-BF16 or AMX: the CPUs on which bf16 matmuls are fast, as the registered `backend` sees it."""
    return get_backend(backend).cpu_has_native_bf16()


def resolve_compute_dtype(
    requested: str | torch.dtype, device: torch.device | str, backend: str = DEFAULT_BACKEND
) -> torch.dtype:
    """The compute dtype to use on `device` with `backend`; raise if an explicit one cannot run there."""
    device = torch.device(device)
    dtype = requested if isinstance(requested, torch.dtype) else torch_dtype(requested)
    if dtype is None:
        return _auto_dtype(device, backend)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"compute_dtype=bfloat16 was requested but {torch.cuda.get_device_name(device)} has no bf16 "
            "support; use compute_dtype='float16' or 'auto'."
        )
    if device.type not in ("cpu", "cuda", "xpu"):
        raise ValueError(f"4-bit layers run on cpu, cuda or xpu devices, not {device.type!r}.")
    return dtype


def _auto_dtype(device: torch.device, backend: str) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16(backend) else torch.float32
    return torch.bfloat16
