"""`DoRALinear`: weight-decomposed LoRA (DoRA), on a full-precision or a 4-bit base.

DoRA (Liu et al. 2024) splits the adapted weight into a direction and a trainable magnitude vector `m`:
`W' = m * (W + s B A) / ||W + s B A||`, the norm taken per output row (PEFT's "weight norm"). As in the
paper's section 4.3 and in PEFT, the norm is treated as a constant (detached), so it costs no memory in
backward. The forward is PEFT's, term for term, so a PEFT model with `use_dora=True` loading our export
computes the same outputs:

    result = base(x) + (m / n - 1) * (W x') + (m / n) * s * B A x'      with x' = dropout(x)

where `W x'` reuses `base(x)` (less its bias) when there is no dropout to apply.

On a 4-bit base the norm needs the full-precision weight: it is dequantized into the thread's reused
workspace, the low-rank update added in place, the row norms taken, and nothing of it is kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.quantization.layers import (
    dequantize_weight,
    is_linear4bit,
    is_quantized,
    layer_backend,
)
from lightning_qlora.quantization.workspace import workspace

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, in state dicts and adapter files
DORA_PEFT_FIELDS: dict[str, Any] = {"use_dora": True}  # what marks a PEFT folder as DoRA


class DoRALinear(LoRALinear):
    """A `LoRALinear` with DoRA's trainable magnitude vector (`lora_magnitude_vector`, one per output).

    The magnitude starts as the row norms of the base weight the layer actually computes with, so right
    after injection the output is exactly the base layer's. When adapters are injected before the base is
    quantized (the ordinary Lightning order), that weight does not exist yet: the magnitude is then filled
    lazily, from the quantized base, on first use (a forward, a merge, a state dict), unless a checkpoint
    or an adapter file has provided it by then.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        scaling: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, scaling=scaling, dtype=dtype)
        device = base_layer.weight.device
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, dtype=dtype, device=device))
        self.magnitude_pending = True
        self._merged_norm: torch.Tensor | None = None
        self.register_state_dict_pre_hook(_materialize_before_saving)
        self._register_load_state_dict_pre_hook(_magnitude_loaded, with_module=True)

    # ------------------------------------------------------------------------------------ magnitude

    def reset_adapter(self) -> None:
        """A and B as in LoRA; the magnitude is recomputed from the base on first use."""
        super().reset_adapter()
        self.magnitude_pending = True

    def base_weight(self) -> torch.Tensor:
        """The base weight in float32, as a new tensor (dequantized for a 4-bit base; unmerged)."""
        if is_linear4bit(self.base_layer):
            return dequantize_weight(self.base_layer, torch.float32)
        weight = self.base_layer.weight.detach().to(torch.float32, copy=True)
        if self.merged:
            weight = self._unmerged(weight)
        return weight

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """Row norms of `W + s B A` (float32, shape (out,)), with W dequantized into a reused buffer."""
        lora_a, lora_b = self.lora_A.detach().float(), self.lora_B.detach().float()
        device = lora_a.device
        buffer = workspace((self.out_features, self.in_features), torch.float32, device)
        if is_quantized(self.base_layer):
            layer_backend(self.base_layer).dequantize_into(self.base_layer, buffer)
        elif is_linear4bit(self.base_layer) or self.merged:
            buffer.copy_(self.base_weight())
        else:
            buffer.copy_(self.base_layer.weight.detach())
        buffer.addmm_(lora_b, lora_a, alpha=self.scaling)
        return torch.linalg.vector_norm(buffer, dim=1)

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """Set the magnitude to the current row norms, so the layer computes its present weight unchanged."""
        self.lora_magnitude_vector.copy_(self.weight_norm().to(self.lora_magnitude_vector.dtype))
        self.magnitude_pending = False

    def materialize(self) -> None:
        """Fill a pending magnitude now (a no-op once it holds values, and on the meta device)."""
        if self.magnitude_pending and self.lora_magnitude_vector.device.type != "meta":
            self.init_magnitude()

    # -------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        self.materialize()
        norm = self.weight_norm()  # a constant: no gradient flows through it (DoRA section 4.3)
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        dropped = self.lora_dropout(x.to(self.lora_A.dtype))
        update = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scaling
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result
        else:  # PEFT's rule: the base's share is recomputed on the dropped-out input
            base_result = self.base_layer(dropped.to(x.dtype))
        bias = self.base_layer.bias
        if bias is not None:
            base_result = base_result - bias.to(base_result.dtype)
        extra = (scale - 1) * base_result.to(scale.dtype) + scale * update.to(scale.dtype)
        return result + extra.to(result.dtype)

    # ----------------------------------------------------------------------------- adapter protocol

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """A, B and the magnitude: all three train, and checkpoints and exports hold all three."""
        return {**super().adapter_params(), MAGNITUDE: self.lora_magnitude_vector}

    def peft_config_fields(self) -> dict[str, Any]:
        return {**super().peft_config_fields(), **DORA_PEFT_FIELDS}

    def peft_tensor_names(self) -> dict[str, str]:
        return {**super().peft_tensor_names(), MAGNITUDE: MAGNITUDE}  # PEFT stores it without `.weight`

    def lora_delta(self) -> torch.Tensor:
        """s B A, the low-rank part of the update (float32)."""
        return super().delta_weight()

    def delta_weight(self) -> torch.Tensor:
        """What a merge adds to the base weight: `m (W + s B A) / ||W + s B A|| - W` (float32)."""
        weight = self.base_weight()
        merged = self.dora_factor() * (weight + self.lora_delta().to(weight.device))
        return merged - weight

    # -------------------------------------------------------------------------------------- merging

    def dora_factor(self) -> torch.Tensor:
        """m / ||W + s B A|| per output row (float32, shape (out, 1)): what a merge multiplies rows by."""
        self.materialize()
        return (self.lora_magnitude_vector.detach().float() / self.weight_norm()).view(-1, 1)

    def merge(self) -> None:
        """Replace a full-precision base weight by the DoRA weight in place (undone by `unmerge`)."""
        if self.merged:
            return
        if is_linear4bit(self.base_layer):
            super().merge()  # raises with the message that points to merge_adapters
        self.materialize()
        weight = self.base_layer.weight
        with torch.no_grad():
            norm = self.weight_norm()
            factor = (self.lora_magnitude_vector.detach().float() / norm).view(-1, 1)
            merged = factor * (weight.float() + self.lora_delta().to(weight.device))
            weight.data.copy_(merged.to(weight.dtype))
        self._merged_norm = norm
        self.merged = True

    def _unmerged(self, merged: torch.Tensor) -> torch.Tensor:
        if self._merged_norm is None:
            raise RuntimeError("This DoRA layer was merged elsewhere; its base weight cannot be recovered.")
        factor = (self.lora_magnitude_vector.detach().float() / self._merged_norm).view(-1, 1)
        return merged / factor - self.lora_delta().to(merged.device)

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.data.copy_(self._unmerged(weight.float()).to(weight.dtype))
        self.merged = False
        self._merged_norm = None

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain `nn.Linear` holding `m * (W + s B A) / ||W + s B A||` (W dequantized for a 4-bit base)."""
        if self.merged:
            weight = self.base_layer.weight.detach().float()
        else:
            self.materialize()
            weight = self.base_weight()
            weight += self.lora_delta().to(weight.device)
            magnitude = self.lora_magnitude_vector.detach().float()
            weight *= (magnitude / torch.linalg.vector_norm(weight, dim=1)).view(-1, 1)
        return self._plain_linear(weight, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def _materialize_before_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """A state dict never holds the placeholder magnitude: fill it from the base first."""
    if isinstance(module, DoRALinear):
        module.materialize()


def _magnitude_loaded(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
) -> None:
    """A magnitude arriving from a checkpoint or adapter file is final: it must not be recomputed."""
    if isinstance(module, DoRALinear) and prefix + MAGNITUDE in state_dict:
        module.magnitude_pending = False
