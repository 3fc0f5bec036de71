"""The CPU 4-bit linear as a torch operator (`torch.ops.lightning_qlora.linear4bit`), built at first use.

Why: the band loop (dequantize a band of rows, multiply it while it is in cache) used to run in Python around
a ctypes kernel that started POSIX threads on every call beside torch's OpenMP pool. With every core busy
(torch's workers spin after each matmul, and a laptop always runs something else) those threads waited
for the scheduler; QLoRA then lost to 32-bit LoRA at two threads and collapsed under load. The operator
(``linear4bit_op.cpp``) runs the whole loop in C++ and dequantizes inside torch's own thread pool
(``at::parallel_for``), creating no thread. As a `torch.library` operator with a fake implementation and an
autograd formula, it is also one opaque node to ``torch.compile``.

Built once with the C++ compiler `cpu_caching_allocator.compiler()` finds, against the installed torch's
headers (``torch/library.h`` and ``ATen/Parallel.h``, not ``torch/extension.h``), cached and sealed by
`lightning_qlora._native_build`. ``LIGHTNING_QLORA_DISABLE_LINEAR_OP=1`` (or the kernel's
``LIGHTNING_QLORA_DISABLE_KERNEL=1``) turns it off; when it cannot be built, `available()` is False after
one log line and the 4-bit layers use the Python band loop, which gives the same bits.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_qlora._native_build import (
    NativeBuildError,
    NativeDisabledError,
    UnsafeCacheError,
    build_and_load,
)

__all__ = ["DISABLE_ENV", "PackedWeight4bit", "available", "build", "input_grad", "linear4bit"]

log = logging.getLogger(__name__)

DISABLE_ENV = "LIGHTNING_QLORA_DISABLE_LINEAR_OP"
KERNEL_DISABLE_ENV = "LIGHTNING_QLORA_DISABLE_KERNEL"
SOURCE = Path(__file__).with_name("linear4bit_op.cpp")
KERNEL_SOURCE = Path(__file__).with_name("dequant4bit.c")  # included by SOURCE
ABI_VERSION = 1
# -ffp-contract=off: a fused multiply-add would change the double-quantized scale's rounding. -fopenmp:
# at::parallel_for is inline code that runs on torch's OpenMP pool only when compiled with OpenMP.
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-fast-math")
STANDARDS = ("-std=c++20", "-std=c++17")  # torch's headers want C++20; older compilers accept C++17


@dataclass(frozen=True)
class PackedWeight4bit:
    """A blockwise 4-bit (NF4/FP4) weight as plain tensors, in bitsandbytes' flat layout.

    `absmax` is float32 (one scale per block), or uint8 when double-quantized, with `nested_code`,
    `nested_absmax`, `nested_blocksize` and `offset` (a one-value float32 tensor, so tracing never turns it
    into a Python number) decoding it. `shape` is (out_features, in_features).
    """

    packed: torch.Tensor
    code: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    nested_code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: torch.Tensor | None = None

    def op_args(self) -> tuple[Any, ...]:
        """The operator's weight arguments, in schema order."""
        return (
            self.packed,
            self.code,
            self.absmax,
            self.nested_code,
            self.nested_absmax,
            self.offset,
            self.nested_blocksize,
            self.blocksize,
        )


_lock = threading.Lock()
_state: dict[str, bool] = {}  # "ok": loaded and checked (set once)


def _flags(standard: str, native: bool) -> tuple[str, ...]:
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    include = Path(torch.__file__).parent / "include"
    march = ("-march=native",) if native else ()
    return (*BASE_FLAGS, standard, *march, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}")


def _link() -> tuple[str, ...]:
    lib = Path(torch.__file__).parent / "lib"
    return (f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}")


def build(directory: Path | None = None, cxx: str | None = None) -> Path:
    """Build (or find in the cache), load and check the operator library; return its path.

    Tries -march=native first (the kernel's AVX2 / AVX-512 loops), then a portable build, each in C++20 and
    then C++17. Building and loading go through `build_and_load`, so the library is loaded only from the
    user's own checked cache folder, through the descriptor that was checked. Raises NativeBuildError.
    """
    from lightning_qlora.quantization.cpu_caching_allocator import compiler

    cxx = cxx or compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set LIGHTNING_QLORA_CXX or CXX, or install g++)")
    link = _link()
    # What else shapes the library: the included kernel source, how it links, torch's ABI.
    extra = f"{hashlib.sha256(KERNEL_SOURCE.read_bytes()).hexdigest()} {link} {torch.__version__}"
    errors: list[str] = []
    for native in (True, False):
        for standard in STANDARDS:
            flags = _flags(standard, native)
            try:
                return build_and_load(
                    "linear4bit_op",
                    SOURCE,
                    cxx,
                    flags,
                    _checked,
                    link=link,
                    extra_key=extra,
                    directory=directory,
                )
            except (UnsafeCacheError, NativeDisabledError):
                raise  # no flags can help
            except (NativeBuildError, OSError) as err:
                errors.append(str(err))
    raise NativeBuildError("; ".join(errors))


def _checked(lib: ctypes.CDLL, path: Path) -> Path:
    """Check the loaded library's ABI (loading registered its operators) and record it as torch would."""
    try:
        version = int(torch.ops.lightning_qlora.linear4bit_abi_version())
    except (RuntimeError, AttributeError) as err:
        raise NativeBuildError(f"{path.name} registers no lightning_qlora operators: {err}") from err
    if version != ABI_VERSION:
        raise NativeBuildError(f"{path.name} has ABI {version}, expected {ABI_VERSION}")
    torch.ops.loaded_libraries.add(str(path))  # as torch.ops.load_library records what it loaded
    return path


def _load() -> None:
    """Build, load, register the fake and autograd implementations and check the operator once."""
    build()
    _register_python_parts()
    _self_check()


def _disabled() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in (DISABLE_ENV, KERNEL_DISABLE_ENV)
    )


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the operator is built, loaded and checked; builds it on the first call, never raises.

    A constant to ``torch.compile``: it runs once, outside the graph, instead of being traced.
    """
    ok = _state.get("ok")
    if ok is not None:
        return ok
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _try_load()
    return _state["ok"]


def _try_load() -> bool:
    if _disabled():
        log.info("lightning-qlora: native CPU 4-bit linear operator disabled; using the Python band loop.")
        return False
    try:
        _load()
    except (UnsafeCacheError, NativeDisabledError) as err:  # said once for all native parts
        log.debug("lightning-qlora: native CPU 4-bit linear operator not used (%s).", err)
        return False
    except (NativeBuildError, OSError, RuntimeError) as err:
        log.warning(
            "lightning-qlora: native CPU 4-bit linear operator unavailable (%s); using the Python band loop.",
            err,
        )
        return False
    return True


def simd_level() -> str | None:
    """Which vector loop the loaded operator's dequantization uses (None when it is unavailable)."""
    if not available():
        return None
    level = int(torch.ops.lightning_qlora.linear4bit_simd_level())
    return {0: "portable C", 1: "AVX2", 2: "AVX-512"}.get(level, str(level))


def workspace_bytes() -> int:
    """Bytes this thread's operator band buffers hold (0 when the operator is not loaded)."""
    if not _state.get("ok"):
        return 0
    return int(torch.ops.lightning_qlora.linear4bit_workspace_bytes())


def release_workspace() -> None:
    """Drop this thread's operator band buffers (rebuilt on the next call)."""
    if _state.get("ok"):
        torch.ops.lightning_qlora.linear4bit_release_workspace()


def linear4bit(
    x: torch.Tensor, weight: PackedWeight4bit, bias: torch.Tensor | None, tile_rows: int
) -> torch.Tensor:
    """`x @ W.T + bias` in x's dtype, W dequantized `tile_rows` rows at a time (the whole weight when
    `tile_rows` >= out_features); differentiable in `x` and `bias`. Needs `available()`."""
    return torch.ops.lightning_qlora.linear4bit(x, *weight.op_args(), weight.shape[0], tile_rows, bias)


def input_grad(grad: torch.Tensor, weight: PackedWeight4bit, tile_rows: int) -> torch.Tensor:
    """`grad @ W` in grad's dtype, band by band. Needs `available()`."""
    return torch.ops.lightning_qlora.linear4bit_input_grad(
        grad, *weight.op_args(), weight.shape[1], tile_rows
    )


# --------------------------------------------------------------------------------------------------------
# The Python halves of the operator: shapes for tracing, and the gradient.
# --------------------------------------------------------------------------------------------------------


def _fake_linear4bit(x: torch.Tensor, *args: Any) -> torch.Tensor:
    out_features = args[8]
    return x.new_empty((*x.shape[:-1], out_features))


def _fake_input_grad(grad: torch.Tensor, *args: Any) -> torch.Tensor:
    in_features = args[8]
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx: Any, inputs: Sequence[Any], output: torch.Tensor) -> None:
    x, *weight_args, _out_features, tile_rows, bias = inputs
    ctx.save_for_backward(*weight_args[:6])  # the packed weight and its constants, not activations
    ctx.scalars = (*weight_args[6:], x.shape[-1], tile_rows)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    packed, code, absmax, nested_code, nested_absmax, offset = ctx.saved_tensors
    nested_blocksize, blocksize, in_features, tile_rows = ctx.scalars
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lightning_qlora.linear4bit_input_grad(
            grad, packed, code, absmax, nested_code, nested_absmax, offset, nested_blocksize, blocksize,
            in_features, tile_rows,
        )  # fmt: skip
    if ctx.has_bias and ctx.needs_input_grad[11]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return (grad_x, *([None] * 10), grad_bias)


def _register_python_parts() -> None:
    torch.library.register_fake("lightning_qlora::linear4bit")(_fake_linear4bit)
    torch.library.register_fake("lightning_qlora::linear4bit_input_grad")(_fake_input_grad)
    torch.library.register_autograd("lightning_qlora::linear4bit", _backward, setup_context=_setup_context)


def _self_check() -> None:
    """Refuse a build whose dequantization differs from the plain-torch decode (grad = I gives W itself)."""
    gen = torch.Generator().manual_seed(1234)
    rows, cols, blocksize = 8, 64, 64
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8, generator=gen)
    code = torch.randn(16, generator=gen)
    absmax = torch.rand(rows * cols // blocksize, generator=gen) + 0.5
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()
    expected = (code[idx] * absmax.repeat_interleave(blocksize)).view(rows, cols)
    weight = PackedWeight4bit(packed, code, absmax, blocksize, (rows, cols))
    for tile_rows in (1, rows):
        got = input_grad(torch.eye(rows), weight, tile_rows)
        if not torch.equal(got.view(torch.int32), expected.view(torch.int32)):
            raise NativeBuildError(f"the 4-bit linear operator failed its self-check (tile_rows={tile_rows})")
