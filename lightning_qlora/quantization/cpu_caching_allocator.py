"""A caching allocator for torch's CPU tensors: freed activation-size blocks are reused, not faulted in anew.

Why: a CPU training step allocates gigabytes in blocks of 128 KiB to a few MiB, the same sizes layer after
layer and step after step. glibc either keeps them in its heap, which fragments (a 0.5B Llama's anonymous
memory grows by a gigabyte in the first step), or, with the mmap threshold `cpu_allocator` sets, maps each
one afresh, so every page is faulted in and zeroed again: a quarter of a step at two threads. This
allocator (``cpu_caching_allocator.cpp``) keeps up to `CACHE_BYTES` of freed blocks, least recently freed
evicted first, and returns everything else to the OS at once: measured on that model, the speed of the
fragmenting heap at a lower peak than the mapped one (see benchmarks/results/train_memory_speed.md).

It is a guest: `install()` puts it in place (``c10::SetCPUAllocator``) and `uninstall()` puts the previous
allocator back; `QLoRAPrecision` holds it for the duration of a fit/validate/test/predict and
`load_quantized` for its load. Tensors allocated meanwhile are still freed by it afterwards. It is built
once with the system C++ compiler (``$LIGHTNING_QLORA_CXX``, else ``$CXX``, else ``c++``/``g++``/``clang++``)
against the headers of the installed torch and cached like the dequantization kernel (see
`lightning_qlora._native_build`). It is not installed when another malloc (jemalloc, tcmalloc, mimalloc) is
preloaded, when ``LIGHTNING_QLORA_DISABLE_ALLOCATOR`` or ``LIGHTNING_QLORA_DISABLE_NATIVE`` is set, or
where it cannot be built or loaded: `install()` returns False after one log line and the mmap threshold
alone applies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from pathlib import Path

import torch

from lightning_qlora._native_build import (
    NativeBuildError,
    NativeDisabledError,
    UnsafeCacheError,
    build_and_load,
    find_compiler,
)

log = logging.getLogger(__name__)

COMPILER_ENV = "LIGHTNING_QLORA_CXX"
DISABLE_ENV = "LIGHTNING_QLORA_DISABLE_ALLOCATOR"
SOURCE = Path(__file__).with_name("cpu_caching_allocator.cpp")
ABI_VERSION = 2
MIN_BYTES = 128 << 10  # smaller requests stay with glibc, whose heap serves them well
CACHE_BYTES = 64 << 20  # freed blocks kept; more bought little speed for its memory (measured)
_STATS = ("cached_bytes", "live_bytes", "hits", "misses", "evictions", "min_bytes", "cap_bytes")
_OTHER_MALLOCS = re.compile(r"lib(jemalloc|tcmalloc\w*|mimalloc)[^/]*\.so")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_attempted = False
_holders = 0  # install() calls not yet matched by uninstall()


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


def _checked(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    """Declare the library's functions; refuse one without them or of another ABI (it is then rebuilt)."""
    names = ("install", "uninstall", "current", "stats", "release_cached")
    try:
        version = lib.lq_alloc_abi_version
        for name in names:
            getattr(lib, f"lq_alloc_{name}")
    except AttributeError as err:
        raise NativeBuildError(f"cannot load {path.name}: {err}") from err
    version.restype = ctypes.c_int
    if version() != ABI_VERSION:
        raise NativeBuildError(f"{path.name} has ABI {version()}, expected {ABI_VERSION}")
    lib.lq_alloc_install.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
    lib.lq_alloc_install.restype = ctypes.c_int
    lib.lq_alloc_uninstall.argtypes = []
    lib.lq_alloc_uninstall.restype = ctypes.c_int
    lib.lq_alloc_current.argtypes = []
    lib.lq_alloc_current.restype = ctypes.c_int
    lib.lq_alloc_stats.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
    lib.lq_alloc_stats.restype = None
    lib.lq_alloc_release_cached.argtypes = []
    lib.lq_alloc_release_cached.restype = None
    return lib


def build(directory: Path | None = None, cxx: str | None = None) -> ctypes.CDLL:
    """Build (or reuse from the cache) and load the allocator library; raise NativeBuildError if it fails.

    A cached library that fails to load or to pass its checks is rebuilt once."""
    cxx = cxx or compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set LIGHTNING_QLORA_CXX or CXX, or install g++)")
    link = _link()
    # The headers' layout of c10::Allocator is torch's ABI: a new torch gets a new build.
    return build_and_load(
        "cpu_caching_allocator",
        SOURCE,
        cxx,
        _flags(),
        _checked,
        link=link,
        extra_key=f"{link} {torch.__version__}",
        directory=directory,
    )


def preloaded_malloc() -> str | None:
    """The name of another malloc this process runs on (preloaded or linked in), if any."""
    candidates = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    try:
        with open("/proc/self/maps") as maps:
            candidates += [line.rsplit(" ", 1)[-1].strip() for line in maps if ".so" in line]
    except OSError:
        pass
    for candidate in candidates:
        found = _OTHER_MALLOCS.search(os.path.basename(candidate))
        if found:
            return found.group(1)
    return None


def _load() -> ctypes.CDLL | None:
    """The library, built and loaded at the first call; None (after one log line) where it cannot be."""
    global _library, _attempted
    if _attempted:
        return _library
    _attempted = True
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        log.info("lightning-qlora: CPU caching allocator disabled by %s.", DISABLE_ENV)
        return None
    other = preloaded_malloc()
    if other is not None:
        log.info("lightning-qlora: %s is in use; the CPU caching allocator is not installed.", other)
        return None
    try:
        _library = build()
    except (UnsafeCacheError, NativeDisabledError) as err:  # said once for all native parts
        log.debug("lightning-qlora: CPU caching allocator not used (%s).", err)
    except Exception as err:  # never an error: memory stays as lean, only slower
        log.warning("lightning-qlora: CPU caching allocator unavailable (%s); using glibc's.", err)
    return _library


def install(min_bytes: int = MIN_BYTES, cache_bytes: int = CACHE_BYTES) -> bool:
    """Allocate torch's CPU tensors of `min_bytes` and more through the cache until the matching
    `uninstall()`; True if they are (the first call's sizes stay; calls nest), False after one log line if
    it cannot be. Each True must be matched by one `uninstall()`."""
    global _holders
    sizes_ok = isinstance(min_bytes, int) and isinstance(cache_bytes, int)
    if not (sizes_ok and min_bytes >= 1 and cache_bytes >= 0):
        raise ValueError(
            f"install: min_bytes must be an integer of at least 1 and cache_bytes one of at least 0, got "
            f"min_bytes={min_bytes!r}, cache_bytes={cache_bytes!r}"
        )
    with _lock:
        lib = _load()
        if lib is None:
            return False
        if _holders == 0:
            status = lib.lq_alloc_install(min_bytes, cache_bytes)
            if status != 1:
                why = "this C library is not glibc" if status == -2 else "torch kept another CPU allocator"
                log.warning("lightning-qlora: %s; the CPU caching allocator is not used.", why)
                return False
            log.debug("lightning-qlora: CPU caching allocator installed (%s)", stats())
        _holders += 1
        return True


def uninstall() -> None:
    """End one `install()`; the last one puts the previous allocator back and returns the cached blocks to
    the OS. Blocks handed out meanwhile are still freed correctly. A no-op without a matching install."""
    global _holders
    with _lock:
        if _holders == 0 or _library is None:
            return
        _holders -= 1
        if _holders == 0:
            _library.lq_alloc_uninstall()
            log.debug("lightning-qlora: CPU caching allocator uninstalled (%s)", stats())


def installed() -> bool:
    """Whether torch allocates its CPU tensors through the cache right now."""
    return _library is not None and _library.lq_alloc_current() == 1


def release_cached() -> None:
    """Return every cached block to the OS (a no-op when the allocator was never loaded)."""
    if _library is not None:
        _library.lq_alloc_release_cached()


def stats() -> dict[str, int] | None:
    """Cached and live bytes, hits, misses, evictions and the two sizes; None when never installed."""
    if _library is None:
        return None
    values = (ctypes.c_longlong * len(_STATS))()
    _library.lq_alloc_stats(values)
    return dict(zip(_STATS, (int(v) for v in values), strict=True))
