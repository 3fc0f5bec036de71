"""What quantization did to a model, in layers, parameters and bytes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_qlora.quantization.backends import backend_of
from lightning_qlora.quantization.layers import SOURCE_DTYPE_ATTR

if TYPE_CHECKING:
    from lightning_qlora.quantization.sensitivity import SensitivityChoice


@dataclass(frozen=True)
class QuantizationReport:
    """Counts and bytes of a (partly) quantized model; `bits_per_quantized_param` is the paper's metric."""

    quantized_layers: int
    kept_linear_layers: int
    quantized_params: int
    kept_params: int
    quantized_bytes_before: int
    quantized_bytes: int
    kept_bytes: int
    # with `keep_sensitive`: each layer's measured effect, and the layers kept in full precision for it
    sensitivity: SensitivityChoice | None = None

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.kept_bytes

    @property
    def total_bytes_before(self) -> int:
        return self.quantized_bytes_before + self.kept_bytes

    def as_dict(self) -> dict[str, object]:
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sensitivity"}
        return {
            **counts,
            **(self.sensitivity.summary() if self.sensitivity is not None else {}),
            "bits_per_quantized_param": self.bits_per_quantized_param,
            "total_bytes": self.total_bytes,
            "total_bytes_before": self.total_bytes_before,
        }

    def table(self) -> str:
        rows = [
            ("", "layers", "parameters", "bytes before", "bytes now"),
            (
                "quantized (4-bit)",
                str(self.quantized_layers),
                f"{self.quantized_params:,}",
                _human(self.quantized_bytes_before),
                _human(self.quantized_bytes),
            ),
            (
                "kept full precision",
                f"{self.kept_linear_layers} linear",
                f"{self.kept_params:,}",
                _human(self.kept_bytes),
                _human(self.kept_bytes),
            ),
            (
                "total",
                "",
                f"{self.quantized_params + self.kept_params:,}",
                _human(self.total_bytes_before),
                _human(self.total_bytes),
            ),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"bits per quantized parameter: {self.bits_per_quantized_param:.3f}")
        if self.sensitivity is not None:
            lines.append(self.sensitivity.table())
        return "\n".join(lines)


def quantization_report(model: nn.Module) -> QuantizationReport:
    """Measure `model` as it is now: packed tensors count at their real size, pending ones as 4-bit."""
    quantized_layers = kept_linear = quantized_params = kept_params = 0
    before = after = kept_bytes = 0
    seen: set[int] = set()
    for module in model.modules():
        backend = backend_of(module)
        if backend is not None:
            layer: nn.Linear = module  # type: ignore[assignment]
            n = layer.in_features * layer.out_features
            quantized_layers += 1
            quantized_params += n
            source = getattr(layer, SOURCE_DTYPE_ATTR, torch.float32)
            before += n * source.itemsize
            after += backend.storage_bytes(layer)
            seen.add(id(layer.weight))
        elif isinstance(module, nn.Linear):
            kept_linear += 1
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        kept_params += param.numel()
        kept_bytes += param.numel() * param.element_size()
    return QuantizationReport(
        quantized_layers=quantized_layers,
        kept_linear_layers=kept_linear,
        quantized_params=quantized_params,
        kept_params=kept_params,
        quantized_bytes_before=before,
        quantized_bytes=after,
        kept_bytes=kept_bytes,
    )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover
