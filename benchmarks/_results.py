"""Shared helpers for benchmark scripts: machine info, result tables and atomic result files.

Every benchmark writes the same pair of files (``<name>.json`` for machines, ``<name>.md`` for people), so
numbers from different scripts and machines can be compared without guessing where they came from.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_value", "machine_info", "markdown_table", "write_results"]


def _package_version(name: str) -> str | None:
    """Return an installed distribution's version, or None, without importing it (imports can be slow)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Describe the software and hardware behind a result, so numbers are never read out of context."""
    import torch

    info: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "bitsandbytes": _package_version("bitsandbytes"),
        "transformers": _package_version("transformers"),
        "lightning": _package_version("lightning"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
    }
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["cuda_device"] = props.name
        info["cuda_device_count"] = torch.cuda.device_count()
        info["cuda_capability"] = f"{props.major}.{props.minor}"
        info["cuda_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def format_value(value: Any) -> str:
    """Format one table cell: 4 significant digits, scientific only for very small or very large values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude < 1e-3 or magnitude >= 1e6:
            return f"{value:.3e}"
        if magnitude >= 1000:
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
) -> str:
    """Render rows as a GitHub Markdown table; ``formats`` maps a column to a format spec (e.g. ``".3f"``).

    Numeric columns are right-aligned so magnitudes line up when read as plain text.
    """
    formats = dict(formats or {})

    def cell(row: Mapping[str, Any], column: str) -> str:
        value = row.get(column)
        spec = formats.get(column)
        if spec is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, spec)
        return format_value(value)

    cells = [[cell(row, column) for column in columns] for row in rows]
    numeric = [
        all(
            isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool)
            for row in rows
            if row.get(column) is not None
        )
        and any(row.get(column) is not None for row in rows)
        for column in columns
    ]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]

    def render(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if is_num else value.ljust(width)
            for value, width, is_num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (width - 1) + ":" if is_num else "-" * width
        for width, is_num in zip(widths, numeric, strict=True)
    ]
    lines = [render(list(columns)), render(rule), *(render(line) for line in cells)]
    return "\n".join(lines) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and ``os.replace`` so readers never see half a file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_results(out_dir: Path, name: str, payload: dict[str, Any], table_md: str) -> None:
    """Write ``<name>.json`` (payload) and ``<name>.md`` (table) into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=False, default=str, allow_nan=True) + "\n"
    _atomic_write_text(out_dir / f"{name}.json", text)
    _atomic_write_text(out_dir / f"{name}.md", table_md if table_md.endswith("\n") else table_md + "\n")
