"""LoRA hyperparameters, each field carrying its help text, checked when the config is made."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lightning_qlora._settings import (
    SettingTypeError,
    check_bool,
    check_choice,
    check_int,
    check_mapping,
    check_number,
    check_patterns,
)
from lightning_qlora.quantization.config import COMPUTE_DTYPES, DEFAULT_EXCLUDE, torch_dtype

if TYPE_CHECKING:  # imported when `dtype` is read, so the CLI's schema reads this module fast
    import torch

    from lightning_qlora.lora.variants import AdapterVariant

OWNER = "LoRA"
# dtypes the A and B matrices may have (the names QuantizationConfig's compute_dtype takes, less "auto").
ADAPTER_DTYPES: tuple[str, ...] = tuple(name for name in COMPUTE_DTYPES if name != "auto")
# How A and B start: LoRA's own rule, or LoftQ's (from the quantization residual of the base).
INIT_METHODS: tuple[str, ...] = ("default", "loftq")


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
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA: a trainable magnitude per output beside the low-rank direction update "
            "(QDoRA on a 4-bit base). The same as variant='dora' (PEFT's name for it)."
        },
    )
    variant: str | None = field(
        default=None,
        metadata={
            "help": "Adapter variant by registered name: 'lora', 'dora', or one added with "
            "lightning_qlora.lora.variants.register_variant. None: 'dora' with use_dora, else 'lora'."
        },
    )
    init: str = field(
        default="default",
        metadata={
            "help": "Start of A and B: 'default' (A random, B zero: the adapted model starts as the base) or "
            "'loftq' (from the quantization residual W - Q(W); needs QLoRAPrecision and full-precision "
            "weights at injection)."
        },
    )
    loftq_iter: int = field(
        default=1,
        metadata={
            "help": "LoftQ rounds of quantization and rank-r SVD (init='loftq'). Above 1 the 4-bit base "
            "differs from plain quantization and is exported beside the adapters."
        },
    )

    share_sibling_input: bool = field(
        default=False,
        metadata={
            "help": "Adapters of projections that read the same input (q/k/v, gate/up) draw one dropout "
            "mask and run one stacked A matmul. Differs from PEFT, which draws a mask per adapter; the "
            "trained parameters and exports are the same kind. Plain LoRA only."
        },
    )

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        check_number(OWNER, "dropout", self.dropout, minimum=0.0, maximum=1.0, max_open=True)
        for pattern, rank in check_mapping(OWNER, "rank_pattern", self.rank_pattern).items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in check_mapping(OWNER, "alpha_pattern", self.alpha_pattern).items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        check_bool(OWNER, "use_rslora", self.use_rslora)
        check_bool(OWNER, "use_dora", self.use_dora)
        variant = _resolve_variant(self.variant, self.use_dora)
        check_bool(OWNER, "share_sibling_input", self.share_sibling_input)
        if self.share_sibling_input and not variant.shares_sibling_input:
            raise ValueError(
                f"LoRA share_sibling_input=True applies to {_titles(lambda v: v.shares_sibling_input)} only; "
                f"{variant.title} (variant {variant.name!r}) applies dropout by its own rule. Set "
                "share_sibling_input=False or choose another variant."
            )
        check_choice(OWNER, "init", self.init, INIT_METHODS)
        if self.init == "loftq" and not variant.supports_loftq:
            raise ValueError(
                f"LoRA init='loftq' is not available for {variant.title} (variant {variant.name!r}); it "
                f"applies to {_titles(lambda v: v.supports_loftq)}. Use init='default'."
            )
        check_int(OWNER, "loftq_iter", self.loftq_iter, minimum=1)
        if self.loftq_iter != 1 and self.init != "loftq":
            raise ValueError(
                f"LoRA loftq_iter={self.loftq_iter} only applies with init='loftq' (init is {self.init!r})."
            )
        if self.adapter_dtype not in ADAPTER_DTYPES:
            allowed = ", ".join(ADAPTER_DTYPES)
            raise ValueError(f"Unknown adapter_dtype {self.adapter_dtype!r}; allowed: {allowed}.")
        target_modules = self.target_modules
        if target_modules is not None:
            target_modules = check_patterns(OWNER, "target_modules", target_modules)
        object.__setattr__(self, "target_modules", target_modules)
        object.__setattr__(self, "exclude", check_patterns(OWNER, "exclude", self.exclude))
        object.__setattr__(
            self, "modules_to_save", check_patterns(OWNER, "modules_to_save", self.modules_to_save)
        )
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    @property
    def dtype(self) -> torch.dtype:
        dtype = torch_dtype(self.adapter_dtype)
        assert dtype is not None
        return dtype

    @property
    def variant_name(self) -> str:
        """The registered variant the adapters are: `variant`, or 'dora' / 'lora' from `use_dora`."""
        return _resolve_variant(self.variant, self.use_dora).name

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def _resolve_variant(name: object, use_dora: bool) -> AdapterVariant:
    """The registered variant `variant` / `use_dora` ask for; an unknown name lists the registered ones."""
    from lightning_qlora.lora.variants import get_variant  # imports torch: only when a config is made

    if name is not None and not isinstance(name, str):
        raise SettingTypeError(
            f"LoRA variant must be a string or None, got {name!r} ({type(name).__name__})."
        )
    if use_dora and name not in (None, "dora"):
        raise ValueError(
            f"LoRA use_dora=True asks for DoRA, but variant={name!r}. Set variant alone (use_dora=True is "
            "variant='dora')."
        )
    return get_variant("dora" if use_dora else (name or "lora"))


def _titles(applies: Callable[[AdapterVariant], bool]) -> str:
    from lightning_qlora.lora.variants import all_variants

    return " and ".join(v.title for v in all_variants() if applies(v)) or "no registered variant"


def _check_rank(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingTypeError(
            f"LoRA {what} must be a positive integer, got {value!r} ({type(value).__name__})."
        )
    if value <= 0:
        raise ValueError(f"LoRA {what} must be a positive integer, got {value!r}.")


def _check_alpha(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingTypeError(
            f"LoRA {what} must be a positive number, got {value!r} ({type(value).__name__})."
        )
    if not math.isfinite(value):
        raise ValueError(f"LoRA {what} must be a finite positive number, got {value!r}.")
    if not value > 0:
        raise ValueError(f"LoRA {what} must be a positive number, got {value!r}.")


@dataclass(frozen=True)
class LoRACallbackSettings:
    """The `LoRA` callback's own arguments beside `LoRAConfig`, kept here so that the command's schema
    reads them (and their defaults) without importing Lightning. The callback checks them."""

    export_dir: str | os.PathLike[str] | None = None
    export_module: str | None = None
    adapter_only_checkpoints: bool = True
    max_skipped_steps: int = 0
