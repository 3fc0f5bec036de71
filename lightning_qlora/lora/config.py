"""LoRA hyperparameters, each field carrying its help text, checked when the config is made."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_qlora.quantization.config import COMPUTE_DTYPES, DEFAULT_EXCLUDE


@dataclass(frozen=True)
class LoRAConfig:
    """Where adapters go and how big they are.

    Defaults are the QLoRA paper's: r=64, alpha=16, dropout 0.1, every linear layer but the LM head.
    """

    r: int = field(default=64, metadata={"help": "Rank of the update B @ A."})
    alpha: float = field(
        default=16.0, metadata={"help": "Scale numerator: the update is scaled by alpha / r."}
    )
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Module-name patterns to adapt; None means every linear layer."}
    )
    exclude: tuple[str, ...] = field(
        default=DEFAULT_EXCLUDE,
        metadata={"help": "Module-name patterns never adapted (the LM head by default)."},
    )
    rank_pattern: Mapping[str, int] = field(
        default_factory=dict, metadata={"help": "Per-pattern rank overrides, e.g. {'q_proj': 16}."}
    )
    alpha_pattern: Mapping[str, float] = field(
        default_factory=dict, metadata={"help": "Per-pattern alpha overrides."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rsLoRA)."})
    modules_to_save: tuple[str, ...] = field(
        default=(), metadata={"help": "Module-name patterns trained fully, in full precision (e.g. a head)."}
    )
    adapter_dtype: str = field(default="float32", metadata={"help": "dtype of the A and B matrices."})

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        if self.adapter_dtype not in COMPUTE_DTYPES or self.adapter_dtype == "auto":
            allowed = ", ".join(k for k in COMPUTE_DTYPES if k != "auto")
            raise ValueError(f"Unknown adapter_dtype {self.adapter_dtype!r}; allowed: {allowed}.")
        object.__setattr__(self, "target_modules", _patterns_or_none(self.target_modules))
        object.__setattr__(self, "exclude", _patterns_or_none(self.exclude) or ())
        object.__setattr__(self, "modules_to_save", _patterns_or_none(self.modules_to_save) or ())
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    @property
    def dtype(self) -> torch.dtype:
        dtype = COMPUTE_DTYPES[self.adapter_dtype]
        assert dtype is not None
        return dtype

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def _check_rank(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LoRA {what} must be a positive integer, got {value!r}.")


def _check_alpha(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"LoRA {what} must be a positive number, got {value!r}.")


def _patterns_or_none(patterns: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    return tuple(str(p) for p in patterns)
