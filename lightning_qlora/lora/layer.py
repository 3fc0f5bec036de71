"""`LoRALinear`: a linear layer plus a trainable low-rank update, `W x + (B A dropout(x)) * scale`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qlora._names import BASE_LAYER
from lightning_qlora.lora.dropout import AdapterDropout
from lightning_qlora.lora.siblings import SiblingGroup
from lightning_qlora.quantization.layers import dequantize_weight, is_linear4bit


class LoRALinear(nn.Module):
    """Wraps a linear layer (full precision or 4-bit) and keeps A and B as plain Parameters.

    Keeping A and B as Parameters rather than `nn.Linear` layers means a quantizer that replaces linear
    layers can never touch them, whichever runs first. B starts at zero, so right after injection the
    output is exactly the base layer's.
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
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r if scaling is None else scaling
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.lora_dropout: nn.Module = AdapterDropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.siblings: SiblingGroup | None = None  # set by `group_siblings` (share_sibling_input)
        self.reset_adapter()
        self._register_load_state_dict_pre_hook(_accept_unwrapped_keys)

    def reset_adapter(self) -> None:
        """A as in the LoRA paper (Kaiming-uniform, like nn.Linear), B zero."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `layer.weight` (dtype, device checks) still works."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.siblings is not None:
            down = self.siblings.down(self, x)
        else:
            down = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if down.dtype != result.dtype:
            update = F.linear(down, self.lora_B)
            return result + (update * self.scaling).to(result.dtype)
        # result + scale * (down @ B^T) as one addmm: one output-size tensor instead of three (the
        # update, the scaled update, the sum). On a CPU each is a fresh allocation, often page-faulted.
        out = torch.addmm(
            result.reshape(-1, self.out_features),
            down.reshape(-1, self.r),
            self.lora_B.t(),
            alpha=self.scaling,
        )
        return out.view(result.shape)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scale, the update folded into the base weight by a merge (computed in fp32)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    # The rest of the adapter protocol (lightning_qlora.lora.adapter.AdapterModule).

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """A and B: what training updates, and what adapter-only checkpoints and exports hold."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def peft_config_fields(self) -> dict[str, Any]:
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return {"lora_dropout": float(p)}

    def peft_tensor_names(self) -> dict[str, str]:
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def merge(self) -> None:
        """Fold the update into a full-precision base weight in place (undone by `unmerge`)."""
        if self.merged:
            return
        if is_linear4bit(self.base_layer):
            raise TypeError(
                "Cannot merge in place into a 4-bit base (re-quantizing would lose the update); use "
                "lightning_qlora.merge_adapters, which dequantizes the base and returns a plain model."
            )
        weight = self.base_layer.weight
        weight.data += self.delta_weight().to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.data -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain `nn.Linear` with the update folded into the (dequantized) base weight."""
        base = dequantize_weight(self.base_layer, torch.float32)
        if not self.merged:
            base += self.delta_weight().to(base.device)
        return self._plain_linear(base, dtype)

    def _plain_linear(self, weight: torch.Tensor, dtype: torch.dtype | None) -> nn.Linear:
        """An `nn.Linear` holding `weight` and this layer's bias (default dtype: fp32 over a 4-bit base)."""
        dtype = dtype or (torch.float32 if is_linear4bit(self.base_layer) else self.base_layer.weight.dtype)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def _accept_unwrapped_keys(
    state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
) -> None:
    """Let a checkpoint of the unadapted model load into the adapted one.

    `x.weight` becomes `x.base_layer.weight`, so a base checkpoint loads after adapters were injected. Only
    the base layer's own names move (`weight`, `bias`, a 4-bit weight's `weight.<state>`), so the adapter's
    tensors keep theirs whatever a variant calls them: no prefix such as `lora_` is assumed.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest in ("weight", "bias") or rest.startswith("weight."):
            state_dict[prefix + BASE_LAYER + "." + rest] = state_dict.pop(key)
