"""What the QLoRA strategies' optimizer is made of: `OptimizerConfig`, checked when it is made.

Apart from `lightning_qlora.strategies` (whose import registers the strategies with Lightning), so that the
training command's schema reads the fields without importing torch or Lightning.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from lightning_qlora._settings import SettingTypeError, check_mapping

if TYPE_CHECKING:
    from torch.optim import Optimizer


def _optimizer_classes() -> dict[str, type[Optimizer]]:
    """Name -> class. bitsandbytes is imported only when a bitsandbytes optimizer is asked for."""
    import torch

    from lightning_qlora._bnb import bitsandbytes

    bnb_optim = bitsandbytes().optim
    return {
        "paged_adamw": bnb_optim.PagedAdamW32bit,
        "paged_adamw_32bit": bnb_optim.PagedAdamW32bit,  # transformers' name for the same optimizer
        "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
        "adamw": torch.optim.AdamW,
    }


OPTIMIZERS = ("paged_adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw")
SCHEDULERS = ("constant", "linear", "cosine")
# Arguments that have their own OptimizerConfig field, so they may not come in through `kwargs` as well.
_FIELD_ARGUMENTS = ("lr", "betas", "eps", "weight_decay")
# Arguments in the signatures of bitsandbytes' AdamW classes that they never pass on (bitsandbytes 0.50).
_BNB_IGNORED = {
    "amsgrad": "bitsandbytes' AdamW has no AMSGrad variant; use name='adamw' for torch's",
    "optim_bits": "the state width is fixed by the name: paged_adamw is 32-bit, paged_adamw_8bit 8-bit",
    "args": "an internal bitsandbytes override object that replaces the other settings",
}


@dataclass(frozen=True)
class OptimizerConfig:
    """What the QLoRA strategies build when the LightningModule has no `configure_optimizers`.

    Defaults are the QLoRA paper's recipe: paged AdamW with 32-bit states, lr 2e-4, betas (0.9, 0.999),
    no weight decay, a constant learning rate. (Its max grad norm of 0.3 is the strategy's `max_grad_norm`,
    applied through the Trainer's gradient clipping.)
    """

    name: str = field(
        default="paged_adamw",
        metadata={
            "help": "paged_adamw (bitsandbytes PagedAdamW32bit, the paper's), paged_adamw_8bit "
            "(PagedAdamW8bit: 8-bit states), or adamw (torch.optim.AdamW). paged_adamw_32bit is an alias."
        },
    )
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam's (beta1, beta2)."})
    eps: float = field(default=1e-8, metadata={"help": "Adam's epsilon."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled (AdamW) weight decay."})
    scheduler: str = field(
        default="constant",
        metadata={"help": "Learning-rate schedule after warmup: constant, linear (to 0) or cosine (to 0)."},
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Steps of linear warmup from 0 (exclusive with warmup_ratio)."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Warmup as a fraction of the run's optimizer steps (exclusive with warmup_steps)."},
    )
    kwargs: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "More arguments of the optimizer class (e.g. amsgrad); unknown ones are an error."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.name!r}; allowed: {', '.join(OPTIMIZERS)}.")
        if not isinstance(self.scheduler, str) or self.scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}.")
        for name in ("lr", "eps", "weight_decay", "warmup_ratio"):
            _check_finite(name, getattr(self, name))
        if not _is_number(self.lr) or not self.lr > 0:
            raise ValueError(f"Optimizer lr must be a positive number, got {self.lr!r}.")
        betas = (
            tuple(self.betas) if isinstance(self.betas, Sequence) and not isinstance(self.betas, str) else ()
        )
        if len(betas) != 2 or not all(_is_number(b) for b in betas):
            raise SettingTypeError(f"Optimizer betas must be two numbers in [0, 1), got {self.betas!r}.")
        for beta in betas:
            _check_finite("betas", beta)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Optimizer betas must be two numbers in [0, 1), got {self.betas!r}.")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if not _is_number(self.eps) or not self.eps >= 0:
            raise ValueError(f"Optimizer eps must be a non-negative number, got {self.eps!r}.")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise ValueError(f"Optimizer weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("Set warmup_steps or warmup_ratio, not both.")
        steps = self.warmup_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}.")
        ratio = self.warmup_ratio
        if ratio is not None and not (_is_number(ratio) and 0 <= ratio < 1):
            raise ValueError(f"warmup_ratio must be a number in [0, 1), got {self.warmup_ratio!r}.")
        object.__setattr__(self, "kwargs", check_mapping("Optimizer", "kwargs", self.kwargs))
        self._check_kwargs()

    @classmethod
    def from_any(cls, value: OptimizerConfig | Mapping[str, Any] | None) -> OptimizerConfig:
        """Accept a config, a mapping of its fields (a Hydra/YAML node), or None for the defaults."""
        if value is None:
            return cls()
        if isinstance(value, OptimizerConfig):
            return value
        if isinstance(value, Mapping):
            names = [f.name for f in fields(cls)]
            unknown = sorted(str(k) for k in value if k not in names)
            if unknown:
                raise ValueError(f"Unknown OptimizerConfig field(s) {unknown}; allowed: {', '.join(names)}.")
            return cls(**{str(k): v for k, v in value.items()})
        raise TypeError(
            f"optimizer must be an OptimizerConfig, a mapping or None, not {type(value).__name__}."
        )

    @property
    def optimizer_class(self) -> type[Optimizer]:
        return _optimizer_classes()[self.name]

    @property
    def is_paged(self) -> bool:
        return self.name.startswith("paged_")

    def _check_kwargs(self) -> None:
        """Unknown arguments fail when the config is made, rather than being dropped or failing later."""
        if not self.kwargs:
            return
        clashing = sorted(k for k in self.kwargs if k in _FIELD_ARGUMENTS)
        if clashing:
            raise ValueError(
                f"Optimizer kwargs {clashing} have their own OptimizerConfig field; set them there instead."
            )
        cls = self.optimizer_class
        ignored = _BNB_IGNORED if cls.__module__.startswith("bitsandbytes") else {}
        dropped = sorted(k for k in self.kwargs if k in ignored)
        if dropped:
            reasons = "; ".join(f"{k}: {ignored[k]}" for k in dropped)
            raise ValueError(
                f"{cls.__qualname__} (optimizer {self.name!r}) accepts but ignores {dropped} ({reasons})."
            )
        parameters = inspect.signature(cls.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        allowed = [
            name
            for name, p in parameters.items()
            if name not in ("self", "params", *_FIELD_ARGUMENTS, *ignored)
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        unknown = sorted(k for k in self.kwargs if k not in allowed)
        if unknown:
            raise ValueError(
                f"{cls.__module__}.{cls.__qualname__} (optimizer {self.name!r}) takes no argument(s) "
                f"{unknown}; allowed kwargs: {', '.join(allowed) or '(none)'}."
            )


OPTIMIZER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(OptimizerConfig))


@dataclass(frozen=True)
class StrategySettings:
    """The defaults of the QLoRA strategies' own arguments beside `OptimizerConfig`: one source for their
    signatures and the trainer configs (`${lq.strategy_default:max_grad_norm}`). The strategies check them."""

    force_optimizer: bool = False
    max_grad_norm: float | None = 0.3  # the paper's gradient-norm clip


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_finite(name: str, value: object) -> None:
    """inf and NaN pass comparisons such as `lr > 0` (inf) or fail them silently (NaN); refuse both."""
    if _is_number(value) and not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"Optimizer {name} must be a finite number, got {value!r}.")
