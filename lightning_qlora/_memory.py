"""Returning freed host memory to the operating system between layers.

glibc keeps freed blocks of up to 32 MiB in its heap, so quantizing a model layer by layer would leave
every layer's full-precision temporaries counted in the process's memory. `malloc_trim` hands them back
(the figure: benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - not glibc
        return None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc only); the caching allocator's blocks go back through
    its own `release_cached`, which callers call first."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
