"""What to quantize and how: the knobs of QLoRA's storage format, checked before any work is done."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lightning_qlora._settings import check_bool, check_int, check_number, check_patterns
from lightning_qlora.quantization.backends import DEFAULT_BACKEND, check_backend_name

if TYPE_CHECKING:  # torch is imported when a dtype is needed, so the CLI's schema reads this module fast
    import torch

OWNER = "QLoRAPrecision"
QuantType = Literal["nf4", "fp4"]
ComputeDType = Literal["auto", "float32", "bfloat16", "float16"]

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
# bitsandbytes' 4-bit kernels support these block sizes (CPU and CUDA).
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# compute_dtype names -> the torch dtype's attribute name (None: "auto", chosen per device)
COMPUTE_DTYPES: dict[str, str | None] = {
    "auto": None,
    "float32": "float32",
    "fp32": "float32",
    "32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "16": "float16",
}


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a `COMPUTE_DTYPES` name stands for (None for "auto")."""
    import torch

    attribute = COMPUTE_DTYPES[name]
    return None if attribute is None else getattr(torch, attribute)


# Like PEFT's "all-linear": the output head of a language model stays in full precision.
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)


@dataclass(frozen=True)
class QuantizationConfig:
    """The storage format of the frozen base weights.

    Defaults are the QLoRA paper's: NF4, blocksize 64, double quantization of the absmax constants.
    """

    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: 'nf4' or 'fp4'."})
    blocksize: int = field(default=64, metadata={"help": "Weights per absmax constant."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the absmax constants to 8 bit."})
    compute_dtype: str | torch.dtype = field(
        default="auto",
        metadata={"help": "dtype of the dequantized matmul: auto, float32, bfloat16, float16."},
    )
    exclude: tuple[str, ...] = field(
        default=DEFAULT_EXCLUDE,
        metadata={"help": "Module-name patterns (fnmatch or dotted suffix) kept in full precision."},
    )
    backend: str = field(
        default=DEFAULT_BACKEND,
        metadata={"help": "4-bit storage backend: 'bitsandbytes', or a name given to register_backend."},
    )
    keep_sensitive: float = field(
        default=0.0,
        metadata={
            "help": "Extra bytes, as a fraction of the 4-bit model, spent on keeping the linear layers that "
            "raise a calibration batch's loss most in full precision (0: quantize all; e.g. 0.05)."
        },
    )

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"Unknown quant_type {self.quant_type!r}; allowed: {', '.join(QUANT_TYPES)}.")
        check_int(OWNER, "blocksize", self.blocksize)
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(
                f"Unsupported blocksize {self.blocksize!r}; allowed: {', '.join(map(str, BLOCKSIZES))}."
            )
        check_bool(OWNER, "double_quant", self.double_quant)
        torch = sys.modules.get("torch")  # a torch.dtype can only be given once torch is imported
        if torch is not None and isinstance(self.compute_dtype, torch.dtype):
            if not self.compute_dtype.is_floating_point:
                raise ValueError(f"compute_dtype must be a floating dtype, got {self.compute_dtype}.")
            if str(self.compute_dtype).removeprefix("torch.") not in COMPUTE_DTYPES.values():
                raise ValueError(
                    f"Unsupported compute_dtype {self.compute_dtype}: bitsandbytes' 4-bit matmul computes in "
                    "torch.float32, torch.bfloat16 or torch.float16."
                )
        elif not isinstance(self.compute_dtype, str) or self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"Unknown compute_dtype {self.compute_dtype!r}; allowed: {', '.join(COMPUTE_DTYPES)}"
                " or one of torch.float32, torch.bfloat16, torch.float16."
            )
        check_backend_name(self.backend)
        number = check_number(
            OWNER, "keep_sensitive", self.keep_sensitive, minimum=0, maximum=1, max_open=True
        )
        object.__setattr__(self, "keep_sensitive", number)
        object.__setattr__(self, "exclude", check_patterns(OWNER, "exclude", self.exclude))


@dataclass(frozen=True)
class PrecisionPluginSettings:
    """`QLoRAPrecision`'s own arguments beside `QuantizationConfig`, kept here so that the command's schema
    reads them (and their defaults) without importing Lightning. The plugin checks them."""

    log_report: bool = True
    # On a CPU (Linux, glibc) serve allocations of 1 MiB and more from their own mappings, so the memory of
    # each step's activations goes back to the OS instead of piling up in the heap, and torch's through a
    # small caching allocator so they are not faulted in afresh (cpu_allocator.py).
    limit_cpu_heap: bool = True
