"""A native CPU kernel that dequantizes blockwise 4-bit weights (NF4/FP4) into a caller-owned buffer.

Why: on CPU, bitsandbytes' public `dequantize_4bit` spends most of its time allocating and first touching a
fresh full-size output and decoding a double-quantized absmax into a full-size temporary. This kernel writes
into a reused buffer, decodes each block's scale on the fly and runs near memory speed. Its output is
bit-identical to bitsandbytes' reference arithmetic (see `dequant4bit.c` for the exact formula).

The C source beside this module is compiled once with the system C compiler (``$LIGHTNING_QLORA_CC``, else
``$CC``, else ``cc``/``gcc``/``clang``) and loaded with ctypes; no torch headers, no ninja. The shared
library is cached, sealed and loaded by `lightning_qlora._native_build` (named by a hash of the source,
the compiler, its flags and the CPU; loaded only from a folder of the user's own).
``LIGHTNING_QLORA_DISABLE_KERNEL=1`` (or ``LIGHTNING_QLORA_DISABLE_NATIVE=1``) turns the kernel off. When
it cannot be built or loaded, `kernel_available()` returns False after one log line and callers use
bitsandbytes instead.

Only plain tensors cross this module's boundary; bitsandbytes objects stay in the backend module.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_qlora._native_build import (
    NativeBuildError,
    NativeDisabledError,
    UnsafeCacheError,
    build_and_load,
    find_compiler,
    load_library,
)

__all__ = [
    "COMPILER_ENV",
    "DISABLE_ENV",
    "dequantize_4bit_into",
    "kernel_available",
    "kernel_info",
]

log = logging.getLogger(__name__)

DISABLE_ENV = "LIGHTNING_QLORA_DISABLE_KERNEL"
COMPILER_ENV = "LIGHTNING_QLORA_CC"
SOURCE = Path(__file__).with_name("dequant4bit.c")
ABI_VERSION = 1
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-std=c11", "-ffp-contract=off", "-fno-fast-math")
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Below this many values one thread is faster than starting others.
_VALUES_PER_THREAD = 1 << 18


@dataclass(frozen=True)
class _Kernel:
    lib: ctypes.CDLL
    path: Path
    simd_level: int
    flags: tuple[str, ...]


_lock = threading.Lock()
_loaded: _Kernel | None = None
_load_attempted = False


def _compiler() -> str | None:
    return find_compiler((COMPILER_ENV, "CC"), ("cc", "gcc", "clang"))


def _open(path: Path, flags: tuple[str, ...]) -> _Kernel:
    """Load a built library (checked by `load_library`) and check it (`_checked`)."""
    return _checked(load_library(path), path, flags)


def _checked(lib: ctypes.CDLL, path: Path, flags: tuple[str, ...]) -> _Kernel:
    """Declare the loaded library's signature and check it on a small input against plain torch."""
    try:
        version = lib.lq_abi_version
        simd = lib.lq_simd_level
        entry = lib.lq_dequantize_4bit
    except AttributeError as err:
        raise NativeBuildError(f"cannot load {path.name}: {err}") from err
    version.restype = ctypes.c_int
    version.argtypes = []
    if version() != ABI_VERSION:
        raise NativeBuildError(f"{path.name} has ABI {version()}, expected {ABI_VERSION}")
    simd.restype = ctypes.c_int
    simd.argtypes = []
    entry.restype = ctypes.c_int
    entry.argtypes = [
        ctypes.c_void_p,  # packed
        ctypes.c_void_p,  # code
        ctypes.c_void_p,  # absmax (float32) or NULL
        ctypes.c_void_p,  # absmax (uint8, double quant) or NULL
        ctypes.c_void_p,  # nested code
        ctypes.c_void_p,  # nested absmax
        ctypes.c_longlong,  # nested blocksize
        ctypes.c_float,  # offset
        ctypes.c_longlong,  # blocksize
        ctypes.c_longlong,  # number of values
        ctypes.c_void_p,  # out
        ctypes.c_int,  # output kind
        ctypes.c_int,  # threads
    ]
    kernel = _Kernel(lib=lib, path=path, simd_level=simd(), flags=flags)
    _self_check(kernel)
    return kernel


def _reference(
    packed: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes' reference arithmetic in plain torch (used only to check a fresh build)."""
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    per_value = scales.repeat_interleave(blocksize)[:n]
    return (code[idx] * per_value).to(dtype)


def _self_check(kernel: _Kernel) -> None:
    """Refuse a build whose output differs from the reference (a miscompile, a fused multiply-add)."""
    gen = torch.Generator().manual_seed(1234)
    n, blocksize, nested_blocksize = 999, 64, 4
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen)
    code = torch.randn(16, generator=gen)
    nblocks = -(-n // blocksize)
    absmax_q = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=gen)
    nested_code = torch.randn(256, generator=gen)
    nested_absmax = torch.rand(-(-nblocks // nested_blocksize), generator=gen) + 0.5
    offset = 0.3
    scales = nested_code[absmax_q.long()] * nested_absmax.repeat_interleave(nested_blocksize)[:nblocks]
    scales = scales + torch.tensor(offset, dtype=torch.float32)
    for dtype in _OUT_KINDS:
        out = torch.empty(n, dtype=dtype)
        _call(
            kernel,
            packed,
            code,
            None,
            absmax_q,
            nested_code,
            nested_absmax,
            nested_blocksize,
            offset,
            blocksize,
            n,
            out,
            2,
        )
        expected = _reference(packed, code, scales, blocksize, n, dtype)
        if not torch.equal(_bits(out), _bits(expected)):
            raise NativeBuildError(f"{kernel.path.name} failed its self-check for {dtype}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def build_kernel(
    cache_dir: Path | None = None, cc: str | None = None, extra_flags: tuple[str, ...] = ()
) -> _Kernel:
    """Build (or reuse from the cache) and load the kernel; raise NativeBuildError when that fails.

    Not cached in memory: `kernel_available()` is the cached entry point. A cached library that fails to
    load or to pass the self-check (a truncated or foreign file) is rebuilt once (`build_and_load`).
    """
    cc = _compiler() if cc is None else cc
    if cc is None:
        raise NativeBuildError("no C compiler found (set LIGHTNING_QLORA_CC or CC, or install gcc)")
    attempts: list[tuple[str, ...]] = []
    if not any(flag.startswith(("-march=", "-mcpu=")) for flag in extra_flags):
        attempts.append((*BASE_FLAGS, "-march=native", *extra_flags))
    attempts.append((*BASE_FLAGS, *extra_flags))
    errors: list[str] = []
    for flags in attempts:
        try:
            return build_and_load(
                "dequant4bit",
                SOURCE,
                cc,
                flags,
                functools.partial(_checked, flags=flags),
                directory=None if cache_dir is None else Path(cache_dir),
            )
        except (UnsafeCacheError, NativeDisabledError):
            raise  # no flags can help
        except (NativeBuildError, OSError) as err:
            errors.append(str(err))
    raise NativeBuildError("; ".join(errors))


def _kernel() -> _Kernel | None:
    global _loaded, _load_attempted
    if _load_attempted:
        return _loaded
    with _lock:
        if not _load_attempted:
            _loaded = _try_load()
            _load_attempted = True
    return _loaded


def _try_load() -> _Kernel | None:
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        log.info(
            "lightning-qlora: native CPU dequantization kernel disabled by %s; using bitsandbytes'.",
            DISABLE_ENV,
        )
        return None
    try:
        return build_kernel()
    except (UnsafeCacheError, NativeDisabledError) as err:  # said once for all native parts
        log.debug("lightning-qlora: native CPU dequantization kernel not used (%s).", err)
        return None
    except (NativeBuildError, OSError) as err:
        log.warning(
            "lightning-qlora: native CPU dequantization kernel unavailable (%s); using bitsandbytes'.", err
        )
        return None


def kernel_available() -> bool:
    """Whether the native kernel is built and loaded; builds it on first call (cached), never raises."""
    return _kernel() is not None


def kernel_info() -> dict[str, object] | None:
    """Where the loaded kernel lives and which vector instructions it uses (None if unavailable)."""
    kernel = _kernel()
    if kernel is None:
        return None
    simd = {0: "portable C", 1: "AVX2", 2: "AVX-512"}.get(kernel.simd_level, str(kernel.simd_level))
    return {"path": str(kernel.path), "simd": simd, "flags": list(kernel.flags)}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_cpu_contiguous(name: str, t: torch.Tensor) -> None:
    _require(
        isinstance(t, torch.Tensor), f"dequantize_4bit_into: {name} must be a torch.Tensor, got {type(t)}."
    )
    _require(t.device.type == "cpu", f"dequantize_4bit_into: {name} must be on the CPU, got {t.device}.")
    _require(t.is_contiguous(), f"dequantize_4bit_into: {name} must be contiguous.")


def _check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    _check_cpu_contiguous(name, t)
    _require(t.dtype == dtype, f"dequantize_4bit_into: {name} must be {dtype}, got {t.dtype}.")
    _require(t.numel() == numel, f"dequantize_4bit_into: {name} must have {numel} elements, got {t.numel()}.")


def dequantize_4bit_into(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    nested_code: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    offset: float = 0.0,
    num_threads: int | None = None,
    begin: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """Dequantize blockwise 4-bit values into `out` (float32, bfloat16 or float16) and return `out`.

    `packed` holds two values per byte, the first in the high nibble (bitsandbytes' order); `code` is the
    16-value code book (NF4 or FP4); `absmax` one float32 scale per block of `blocksize` values, or, when
    double-quantized, one uint8 per block decoded as ``nested_code[q] * nested_absmax[b // nested_blocksize]
    + offset``. `out.numel()` is the number of values; its shape is the caller's. `num_threads` defaults to
    ``torch.get_num_threads()`` (small tensors use one). With `begin`/`total` it writes values ``[begin,
    begin + out.numel())`` of a tensor of `total` values (a tile of rows, so the caller can multiply while
    it is still in cache); `begin` must start a block (a block of nested blocks when double-quantized).
    Every argument is checked before memory is touched. Raises RuntimeError if the kernel is unavailable
    (check `kernel_available()` first).
    """
    _check_cpu_contiguous("out", out)
    _require(
        out.dtype in _OUT_KINDS,
        f"dequantize_4bit_into: out must be float32, bfloat16 or float16, got {out.dtype}.",
    )
    _require(
        isinstance(blocksize, int)
        and not isinstance(blocksize, bool)
        and blocksize > 0
        and blocksize % 2 == 0,
        f"dequantize_4bit_into: blocksize must be a positive even integer, got {blocksize!r}.",
    )
    n = out.numel()
    size = n if total is None else total
    _require(
        _is_int(begin) and _is_int(size) and begin >= 0 and begin + n <= size,
        f"dequantize_4bit_into: begin={begin!r} and total={total!r} must give a range of {n} values "
        "inside the tensor (0 <= begin, begin + out.numel() <= total).",
    )
    nblocks = -(-size // blocksize)
    _check_tensor("packed", packed, torch.uint8, (size + 1) // 2)
    _check_tensor("code", code, torch.float32, 16)
    nested = nested_code is not None or nested_absmax is not None
    if nested:
        _require(
            nested_code is not None and nested_absmax is not None,
            "dequantize_4bit_into: double quantization needs both nested_code and nested_absmax.",
        )
        assert nested_code is not None and nested_absmax is not None
        _require(
            isinstance(nested_blocksize, int)
            and not isinstance(nested_blocksize, bool)
            and nested_blocksize > 0,
            f"dequantize_4bit_into: nested_blocksize must be a positive integer, got {nested_blocksize!r}.",
        )
        _check_tensor("absmax", absmax, torch.uint8, nblocks)
        _check_tensor("nested_code", nested_code, torch.float32, 256)
        _check_tensor("nested_absmax", nested_absmax, torch.float32, -(-nblocks // nested_blocksize))
    else:
        _require(
            not (isinstance(absmax, torch.Tensor) and absmax.dtype == torch.uint8),
            "dequantize_4bit_into: a uint8 (double-quantized) absmax needs nested_code and nested_absmax.",
        )
        _check_tensor("absmax", absmax, torch.float32, nblocks)
    _require(
        isinstance(offset, (int, float)) and not isinstance(offset, bool),
        f"dequantize_4bit_into: offset must be a float, got {offset!r}.",
    )
    threads = torch.get_num_threads() if num_threads is None else num_threads
    _require(
        isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1,
        f"dequantize_4bit_into: num_threads must be a positive integer, got {num_threads!r}.",
    )
    kernel = _kernel()
    if n == 0:
        return out
    if kernel is None:
        raise RuntimeError(
            "dequantize_4bit_into: the native kernel is unavailable here; "
            "check kernel_available() and use bitsandbytes instead."
        )
    if begin:
        step = blocksize * (nested_blocksize if nested else 1)
        _require(
            begin % step == 0,
            f"dequantize_4bit_into: begin={begin} must be a multiple of {step} (where a "
            f"{'block of nested blocks' if nested else 'block'} starts).",
        )
        block = begin // blocksize
        packed = packed[begin // 2 :]
        absmax = absmax[block:]
        if nested:
            assert nested_absmax is not None
            nested_absmax = nested_absmax[block // nested_blocksize :]
    threads = max(1, min(threads, n // _VALUES_PER_THREAD))
    if nested:
        _call(
            kernel,
            packed,
            code,
            None,
            absmax,
            nested_code,
            nested_absmax,
            nested_blocksize,
            float(offset),
            blocksize,
            n,
            out,
            threads,
        )
    else:
        _call(kernel, packed, code, absmax, None, None, None, 1, 0.0, blocksize, n, out, threads)
    return out


def _call(
    kernel: _Kernel,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax_f32: torch.Tensor | None,
    absmax_u8: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_blocksize: int,
    offset: float,
    blocksize: int,
    n: int,
    out: torch.Tensor,
    threads: int,
) -> None:
    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    status = kernel.lib.lq_dequantize_4bit(
        ptr(packed),
        ptr(code),
        ptr(absmax_f32),
        ptr(absmax_u8),
        ptr(nested_code),
        ptr(nested_absmax),
        nested_blocksize,
        offset,
        blocksize,
        n,
        ptr(out),
        _OUT_KINDS[out.dtype],
        threads,
    )
    if status != 0:
        raise RuntimeError(f"dequantize_4bit_into: the kernel refused its arguments (status {status}).")
