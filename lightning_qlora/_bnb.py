"""The one place bitsandbytes is imported, so a missing install fails with the fix in the message."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


class BitsandbytesMissingError(ImportError):
    """bitsandbytes is not installed (or cannot load its native library)."""


@functools.cache
def bitsandbytes() -> ModuleType:
    """Import bitsandbytes once and return it; raise a message that names the fix if it is missing."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:  # pragma: no cover - the test suite runs with bitsandbytes installed
        raise BitsandbytesMissingError(
            "lightning-qlora needs bitsandbytes (>= 0.48, which runs on CPU as well as CUDA) for 4-bit "
            f"quantization and paged optimizers, but importing it failed: {err}. "
            "Install it with `pip install 'bitsandbytes>=0.48'`."
        ) from err
