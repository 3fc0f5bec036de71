"""A caching allocator for torch's CPU tensors: freed activation-size blocks are reused, not faulted in anew.

Why: a CPU training step allocates gigabytes in blocks of 128 KiB to a few MiB, the same sizes layer after
layer and step after step. glibc either keeps them in its heap, which fragments (a 0.5B Llama's anonymous
memory grows by a gigabyte in the first step), or, with the mmap threshold `cpu_allocator` sets, maps each
one afresh, so every page is faulted in and zeroed again: a quarter of a step at two threads. This
allocator (``cpu_caching_allocator.cpp``) keeps up to `CACHE_BYTES` of freed blocks, least recently freed
evicted first, and returns everything else to the OS at once: measured on that model, the speed of the
fragmenting heap at a lower peak than the mapped one (see benchmarks/results/train_memory_speed.md).

It is built once with the system C++ compiler (``$LIGHTNING_QLORA_CXX``, else ``$CXX``, else
``c++``/``g++``/``clang++``) against the headers of the installed torch, cached like the dequantization
kernel, and installed with ``c10::SetCPUAllocator`` for the rest of the process. Where it cannot be built or
loaded, `install()` returns False after one log line and the mmap threshold alone applies.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

from lightning_qlora._native_build import (
    NativeBuildError,
    cache_dir,
    compile_library,
    find_compiler,
    is_sealed,
    library_path,
)

log = logging.getLogger(__name__)

COMPILER_ENV = "LIGHTNING_QLORA_CXX"
SOURCE = Path(__file__).with_name("cpu_caching_allocator.cpp")
ABI_VERSION = 1
MIN_BYTES = 128 << 10  # smaller requests stay with glibc, whose heap serves them well
CACHE_BYTES = 64 << 20  # freed blocks kept; more bought little speed for its memory (measured)
_STATS = ("cached_bytes", "live_bytes", "hits", "misses", "evictions", "min_bytes", "cap_bytes")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_attempted = False


def _flags() -> tuple[str, ...]:
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    include = Path(torch.__file__).parent / "include"
    abi_flag = f"-D_GLIBCXX_USE_CXX11_ABI={abi}"
    return ("-O2", "-shared", "-fPIC", "-pthread", "-std=c++17", abi_flag, f"-I{include}")


def _link() -> tuple[str, ...]:
    lib = Path(torch.__file__).parent / "lib"
    return (f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}")


def compiler() -> str | None:
    """The C++ compiler `build` uses: an explicit setting wins, else the first found."""
    return find_compiler((COMPILER_ENV, "CXX"), ("c++", "g++", "clang++"))


def build(directory: Path | None = None, cxx: str | None = None) -> ctypes.CDLL:
    """Build (or reuse from the cache) and load the allocator library; raise NativeBuildError if it fails."""
    cxx = cxx or compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set LIGHTNING_QLORA_CXX or CXX, or install g++)")
    flags = _flags()
    # The headers' layout of c10::Allocator is torch's ABI: a new torch gets a new build.
    directory = directory or cache_dir()
    link = _link()
    path = library_path(directory, "cpu_caching_allocator", SOURCE, cxx, flags, f"{link} {torch.__version__}")
    if not is_sealed(path):
        compile_library(cxx, flags, SOURCE, path, link)
    try:
        lib = ctypes.CDLL(str(path))
        version = lib.lq_alloc_abi_version
    except (OSError, AttributeError) as err:
        raise NativeBuildError(f"cannot load {path.name}: {err}") from err
    version.restype = ctypes.c_int
    if version() != ABI_VERSION:
        raise NativeBuildError(f"{path.name} has ABI {version()}, expected {ABI_VERSION}")
    lib.lq_alloc_install.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
    lib.lq_alloc_install.restype = ctypes.c_int
    lib.lq_alloc_stats.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
    lib.lq_alloc_stats.restype = None
    lib.lq_alloc_release_cached.argtypes = []
    lib.lq_alloc_release_cached.restype = None
    return lib


def install(min_bytes: int = MIN_BYTES, cache_bytes: int = CACHE_BYTES) -> bool:
    """Allocate torch's CPU tensors of `min_bytes` and more through the cache from now on, for the rest of
    the process; True if they are (the first call's sizes stay), False after one log line if it cannot be."""
    global _library, _attempted
    with _lock:
        if not _attempted:
            _attempted = True
            try:
                lib = build()
                status = lib.lq_alloc_install(min_bytes, cache_bytes)
                if status != 1:
                    raise NativeBuildError(
                        f"invalid sizes min_bytes={min_bytes}, cache_bytes={cache_bytes}"
                        if status < 0
                        else "torch kept another CPU allocator of higher priority"
                    )
                _library = lib
                log.debug("lightning-qlora: CPU caching allocator installed (%s)", stats())
            except Exception as err:  # never an error: memory stays as lean, only slower
                log.warning("lightning-qlora: CPU caching allocator unavailable (%s); using glibc's.", err)
    return _library is not None


def installed() -> bool:
    """Whether this process allocates its CPU tensors through the cache."""
    return _library is not None


def release_cached() -> None:
    """Return every cached block to the OS (a no-op when the allocator is not installed)."""
    if _library is not None:
        _library.lq_alloc_release_cached()


def stats() -> dict[str, int] | None:
    """Cached and live bytes, hits, misses, evictions and the two sizes; None when not installed."""
    if _library is None:
        return None
    values = (ctypes.c_longlong * len(_STATS))()
    _library.lq_alloc_stats(values)
    return dict(zip(_STATS, (int(v) for v in values), strict=True))
