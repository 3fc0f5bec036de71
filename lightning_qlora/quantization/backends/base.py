"""What a 4-bit storage backend provides: the one interface the rest of the package uses.

A backend owns a layer type (an `nn.Linear` subclass, so adapters, PEFT and module walks keep seeing a
linear layer), its packed weight format and its state-dict form. Conversion, loading, reports, the
LoRA callback, export and merge call these methods instead of reaching into a library's internals, so a
new backend is one module plus a `QuantizationConfig.backend` value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: the config (and the CLI's schema) import this registry
    import torch
    from torch import nn


class QuantizationFormat(Protocol):
    """What a backend reads of a `QuantizationConfig`. The config imports the registry to check its
    backend name, so the backends name the fields they need instead of importing the config."""

    @property
    def quant_type(self) -> str: ...

    @property
    def blocksize(self) -> int: ...

    @property
    def double_quant(self) -> bool: ...


class QuantizationBackend(Protocol):
    """A 4-bit format for frozen linear weights."""

    name: str

    def make_layer(
        self, linear: nn.Linear, config: QuantizationFormat, compute_dtype: torch.dtype | None
    ) -> nn.Linear:
        """A 4-bit layer taking over `linear`'s weight without copying it (quantized later, by `quantize`)."""
        ...

    def set_full_precision_weight(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        """Give `layer` a new full-precision weight, pending quantization (its format settings stay)."""
        ...

    def quantize(self, layer: nn.Linear, device: torch.device | None) -> None:
        """Pack a pending weight now, on `device` (None: where it is); a no-op once packed."""
        ...

    def is_4bit_layer(self, module: nn.Module) -> bool:
        """True for this backend's layer type, packed or pending."""
        ...

    def is_quantized(self, layer: nn.Linear) -> bool:
        """True once the layer's weight holds packed codes."""
        ...

    def logical_shape(self, tensor: torch.Tensor) -> torch.Size | None:
        """The (out, in) shape a packed weight encodes; None if `tensor` is not this backend's."""
        ...

    def dequantize(self, layer: nn.Linear, dtype: torch.dtype | None) -> torch.Tensor:
        """The weight in full precision as a new (out, in) tensor (in `dtype`, default the compute dtype)."""
        ...

    def dequantize_into(self, layer: nn.Linear, out: torch.Tensor) -> torch.Tensor:
        """Write the (out, in) weight into `out` (any floating dtype, same device) without allocating it."""
        ...

    def set_compute_dtype(self, layer: nn.Linear, dtype: torch.dtype) -> None:
        """Make the layer dequantize into and compute in `dtype`."""
        ...

    def storage_bytes(self, layer: nn.Linear) -> int:
        """Bytes the packed weight takes (codes plus statistics); what it will take if still pending."""
        ...

    def state_dict_tensors(self, layer: nn.Linear) -> dict[str, torch.Tensor]:
        """The tensors a packed weight is saved as, keyed relative to the layer (`weight`, `weight.*`)."""
        ...

    def cpu_has_native_bf16(self) -> bool:
        """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), as the library that computes
        sees it; `compute_dtype="auto"` picks bf16 on a CPU only then."""
        ...

    def load_from_state_dict(self, layer: nn.Linear, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Rebuild the weight from `state_dict` (its packed form, or a full-precision weight to quantize).

        Called from the layer's load_state_dict pre-hook; consumes the entries it reads so PyTorch's
        own loading sees a consistent state dict.
        """
        ...
