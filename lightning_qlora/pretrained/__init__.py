"""Pretrained models that install from the package index and run offline, by name or by folder.

``resolve_model_path("smollm2-135m-instruct")`` returns a local transformers folder (converted once and
cached); any other value is taken as a folder path and returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .gguf import convert_gguf
from .smollm2 import MODEL_NAME as SMOLLM2_NAME
from .smollm2 import cache_root, cached_conversion, packaged_gguf, smollm2_instruct_path

PRETRAINED_MODELS: dict[str, Callable[[], Path]] = {SMOLLM2_NAME: smollm2_instruct_path}
"""Model names accepted wherever a model or tokenizer folder is expected."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A known model name becomes its local folder (converting it the first time); a path stays as is."""
    maker = PRETRAINED_MODELS.get(str(name_or_path))
    return maker() if maker is not None else Path(name_or_path)


__all__ = [
    "PRETRAINED_MODELS",
    "SMOLLM2_NAME",
    "cache_root",
    "cached_conversion",
    "convert_gguf",
    "packaged_gguf",
    "resolve_model_path",
    "smollm2_instruct_path",
]
