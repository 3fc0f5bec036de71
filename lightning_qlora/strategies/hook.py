"""What the QLoRA strategies add to Lightning's: optimizer, gradient clipping, activation checkpointing.

The optimizer is built in `Strategy.setup_optimizers`, the one place that runs after the precision plugin
converted the model and the LoRA callback froze it (so the trainable set is final) and after the model
reached its device, and before the precision plugin connects the optimizers. No Callback hook runs there.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lightning_qlora._logging import rank_zero_info, rank_zero_warn
from lightning_qlora._names import describe_names
from lightning_qlora._settings import check_bool, check_number, config_from
from lightning_qlora._train_mode import ensure_training
from lightning_qlora.strategies.optim import OptimizerConfig, build_optimizer, build_scheduler

ActivationCheckpointing = type | str | Sequence[type | str] | None

# The message bitsandbytes warns with when a paged optimizer's parameters are on the CPU.
_CPU_PAGING_WARNING = r"Paged optimizers are not supported on CPU"


class NoTrainableParametersError(ValueError):
    """The model has no parameter with requires_grad, so the strategy has nothing to optimize."""


class _PagedOptimizerMixin(Strategy):
    """Shared by `QLoRAStrategy` and `QLoRADDPStrategy`; put it first in the bases so its hooks win.

    Subclasses call `_init_qlora` in their `__init__`.
    """

    optimizer_config: OptimizerConfig
    force_optimizer: bool
    max_grad_norm: float | None
    activation_checkpointing: ActivationCheckpointing
    _checkpointed: list[nn.Module]

    def _init_qlora(
        self,
        optimizer: OptimizerConfig | Mapping[str, Any] | None,
        optimizer_kwargs: Mapping[str, Any],
        force_optimizer: bool,
        max_grad_norm: float | None,
        activation_checkpointing: ActivationCheckpointing,
    ) -> None:
        name = type(self).__name__
        given = OptimizerConfig.from_any(optimizer) if optimizer is not None else None
        own = [
            p
            for p, spec in inspect.signature(type(self).__init__).parameters.items()
            if p != "self" and spec.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        self.optimizer_config = config_from(OptimizerConfig, given, optimizer_kwargs, name, own)
        if max_grad_norm is not None:
            check_number(name, "max_grad_norm", max_grad_norm, minimum=0.0, min_open=True)
        self.force_optimizer = check_bool(name, "force_optimizer", force_optimizer)
        self.max_grad_norm = max_grad_norm
        _check_activation_checkpointing_spec(activation_checkpointing)
        self.activation_checkpointing = activation_checkpointing
        self._checkpointed = []
        self._shimmed_module: pl.LightningModule | None = None
        self._user_configure_optimizers = False
        self._unpaged_optimizers: list[Optimizer] = []  # built by the strategy, paged, on the CPU

    @override
    def connect(self, model: pl.LightningModule) -> None:
        """Let a module without `configure_optimizers` pass Lightning's pre-fit check (which demands one).

        The check runs before any strategy setup, so the module gets an instance-level
        `configure_optimizers` that returns the strategy's optimizer; it is removed again at teardown.
        """
        self._remove_configure_optimizers()
        super().connect(model)
        self._user_configure_optimizers = is_overridden("configure_optimizers", model)
        if not self._user_configure_optimizers:
            model.configure_optimizers = self._strategy_configure_optimizers  # type: ignore[method-assign,assignment]
            self._shimmed_module = model

    def _remove_configure_optimizers(self) -> None:
        module = self._shimmed_module
        if module is not None and "configure_optimizers" in module.__dict__:
            del module.configure_optimizers  # the class's method shows through again
        self._shimmed_module = None

    def _strategy_configure_optimizers(self) -> dict[str, Any]:
        """What `configure_optimizers` would return for the strategy's optimizer (for direct callers)."""
        module = self.lightning_module
        assert module is not None
        optimizer, scheduler = self._build_optimizer(module.trainer, module)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Install the configured optimizer over exactly the trainable parameters, unless the user has one."""
        module = self.lightning_module
        assert module is not None
        self._apply_max_grad_norm(trainer, module)
        name = type(self).__name__
        user = self._user_configure_optimizers  # found in `connect`, before the stand-in was installed
        if user and not self.force_optimizer:
            rank_zero_info(
                f"{name}: using {type(module).__name__}.configure_optimizers; pass force_optimizer=True to "
                f"install the strategy's {self.optimizer_config.name} instead."
            )
            super().setup_optimizers(trainer)
            return
        optimizer, scheduler = self._build_optimizer(trainer, module)
        config = self.optimizer_config
        params = [p for group in optimizer.param_groups for p in group["params"]]
        force_note = "; force_optimizer=True, so configure_optimizers is not called" if user else ""
        schedule = "constant" if scheduler is None else repr(scheduler.lr_lambdas[0])
        rank_zero_info(
            f"{name}: {type(optimizer).__name__} over {len(params)} trainable tensors "
            f"({sum(p.numel() for p in params):,} parameters), lr {config.lr:g}, betas {config.betas}, "
            f"weight decay {config.weight_decay:g}, schedule {schedule}{force_note}"
        )
        self.optimizers = [optimizer]
        self.lr_scheduler_configs = (
            [] if scheduler is None else [LRSchedulerConfig(scheduler, interval="step")]
        )

    def _build_optimizer(
        self, trainer: pl.Trainer, module: pl.LightningModule
    ) -> tuple[Optimizer, LambdaLR | None]:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise NoTrainableParametersError(
                f"{type(self).__name__} found no trainable parameter in {type(module).__name__}: every "
                "parameter has requires_grad=False. Add the LoRA callback (`Trainer(callbacks=[LoRA()])`), "
                "which injects trainable adapters, or set requires_grad=True on the parameters to train."
            )
        config = self.optimizer_config
        optimizer = build_optimizer(params, config)
        total = (
            trainer.estimated_stepping_batches if _needs_total_steps(config) or config.warmup_steps else None
        )
        _warn_if_warmup_outlasts_the_run(config, total)
        scheduler = build_scheduler(optimizer, config, total)
        if config.is_paged and any(p.device.type == "cpu" for p in params):
            self._unpaged_optimizers.append(optimizer)
            rank_zero_info(
                f"{type(self).__name__}: the parameters are on the CPU, where bitsandbytes does not page "
                f"optimizer state (paging is a CUDA feature); {type(optimizer).__name__} runs unpaged."
            )
        return optimizer, scheduler

    def _apply_max_grad_norm(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """The paper's max grad norm goes through the Trainer's own clipping, unless the user chose one."""
        if self.max_grad_norm is None or trainer.gradient_clip_val is not None:
            return
        if not module.automatic_optimization:
            return  # Lightning clips only in automatic optimization; manual loops call clip_gradients
        algorithm = trainer.gradient_clip_algorithm
        if algorithm is not None and algorithm != GradClipAlgorithmType.NORM:
            rank_zero_info(
                f"{type(self).__name__}: max_grad_norm={self.max_grad_norm} not applied: the Trainer's "
                f"gradient_clip_algorithm is {algorithm.value!r}."
            )
            return
        trainer.gradient_clip_val = self.max_grad_norm
        trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM
        rank_zero_info(
            f"{type(self).__name__}: clipping gradients to norm {self.max_grad_norm} "
            "(set Trainer(gradient_clip_val=...) or max_grad_norm=None to change it)."
        )

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Step, then free the gradients the step has consumed (automatic optimization only).

        Lightning zeroes gradients just before the next backward, so the last step's gradients stay
        allocated through the whole next forward pass, interleaved with its temporaries (on CPU glibc then
        grows the heap instead of reusing memory). A plain PyTorch loop or transformers' Trainer frees them
        right after the step; so does this. A module that overrides `optimizer_zero_grad` keeps its own.
        """
        if any(optimizer is built for built in self._unpaged_optimizers):
            with _quiet_cpu_paging():
                output = super().optimizer_step(optimizer, closure, model, **kwargs)
        else:
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        module = self.lightning_module
        if (
            module is not None
            and module.automatic_optimization
            and not is_overridden("optimizer_zero_grad", module)
        ):
            optimizer.zero_grad(set_to_none=True)
        return output

    @override
    def _setup_model(self, model: nn.Module) -> Any:  # Any: DDPStrategy's returns the DDP wrapper
        """Checkpoint activations before any wrapper (DDP) sees the model."""
        if self.activation_checkpointing is not None:
            self._apply_activation_checkpointing(model)
        return super()._setup_model(model)

    def _apply_activation_checkpointing(self, model: nn.Module) -> None:
        targets = activation_checkpoint_targets(model, self.activation_checkpointing)
        new = [m for m in targets if not isinstance(m.__dict__.get("forward"), _CheckpointedForward)]
        for sub in new:
            enable_activation_checkpointing(sub)
        self._checkpointed.extend(new)
        if new:
            classes = sorted({type(m).__name__ for m in new})
            rank_zero_info(
                f"{type(self).__name__}: activation checkpointing (non-reentrant) on {len(new)} module(s) of "
                f"class {', '.join(classes)}."
            )

    @override
    def on_train_start(self) -> None:
        """Checkpointing recomputes only in training mode: a model loaded in eval mode is switched."""
        module = self.lightning_module
        if module is not None and self._checkpointed:
            ensure_training(module, self._checkpointed, type(self).__name__, "checkpoints")
        super().on_train_start()

    def _restore_module(self) -> None:
        """Give the model back as it came in: its own forwards and `configure_optimizers`. Idempotent."""
        for sub in self._checkpointed:
            disable_activation_checkpointing(sub)
        self._checkpointed = []
        self._remove_configure_optimizers()
        self._unpaged_optimizers = []

    @override
    def on_exception(self, exception: BaseException) -> None:
        """A stage raised: restore now (Lightning's teardown follows and finds nothing left to undo)."""
        self._restore_module()
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        self._restore_module()
        super().teardown()


def _warn_if_warmup_outlasts_the_run(config: OptimizerConfig, total: float | int | None) -> None:
    """A warmup as long as the run never reaches the learning rate asked for: say so (it may be a test)."""
    warmup = config.warmup_steps
    if not warmup or total is None or not math.isfinite(float(total)) or warmup < total:
        return
    rank_zero_warn(
        f"warmup_steps={warmup} is not shorter than the run's {int(total)} optimizer steps: the learning "
        f"rate rises for the whole run and never reaches lr={config.lr:g}. Lower warmup_steps, or use "
        "warmup_ratio."
    )


def _needs_total_steps(config: OptimizerConfig) -> bool:
    return config.scheduler != "constant" or config.warmup_ratio is not None


@contextmanager
def _quiet_cpu_paging() -> Iterator[None]:
    """Ignore bitsandbytes' CPU paging warning inside the block; the strategy logs one line instead.

    bitsandbytes warns when its optimizer first makes state for CPU parameters, inside `step`. The filter
    covers that one message and only while the strategy runs the step of the optimizer it built; the
    previous filters come back when the block ends, whether it returns or raises.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CPU_PAGING_WARNING, category=UserWarning)
        yield


def _check_activation_checkpointing_spec(spec: ActivationCheckpointing) -> None:
    items = _spec_items(spec)
    bad = [s for s in items if not isinstance(s, (type, str))]
    if bad:
        raise TypeError(
            f"activation_checkpointing takes module classes or class names, got {', '.join(map(repr, bad))}."
        )


def _spec_items(spec: ActivationCheckpointing) -> list[Any]:
    if spec is None:
        return []
    if isinstance(spec, (type, str)):
        return [spec]
    return list(spec)


def activation_checkpoint_targets(model: nn.Module, spec: ActivationCheckpointing) -> list[nn.Module]:
    """The outermost submodules of `model` whose class is named by `spec` (classes, or class names).

    Raises if an entry of `spec` names no class present in the model: a typo would otherwise silently
    train without checkpointing (and run out of memory later).
    """
    present: dict[type, None] = dict.fromkeys(type(m) for m in model.modules())
    classes: list[type] = []
    for item in _spec_items(spec):
        if isinstance(item, str):
            found = [c for c in present if item in (c.__name__, f"{c.__module__}.{c.__qualname__}")]
        else:
            found = [c for c in present if issubclass(c, item)]
        if not found:
            label = item if isinstance(item, str) else item.__qualname__
            names = sorted({c.__name__ for c in present})
            raise ValueError(
                f"activation_checkpointing: no module of class {label!r} in {type(model).__name__}. "
                f"Classes present: {describe_names(names, limit=12)}."
            )
        classes.extend(found)
    wanted = set(classes)
    targets: list[nn.Module] = []
    inside: list[str] = []
    for name, sub in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if type(sub) in wanted:
            targets.append(sub)
            inside.append(name + ".")
    return targets


class _CheckpointedForward:
    """Instance-level `forward` that recomputes the module's activations in backward.

    The module tree is left as it is (no `CheckpointWrapper` in between), so parameter names, state-dict
    keys and PEFT export names stay those of the model. Only training forwards with grad are checkpointed.
    Holds the module (not a closure), so `copy.deepcopy` and pickling of the model keep working.
    """

    def __init__(self, module: nn.Module, original: Callable[..., Any] | None) -> None:
        self.module = module
        self.original = original  # an instance-level forward that was there before, if any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.original or functools.partial(type(self.module).forward, self.module)
        if self.module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **_without_kv_cache(self.module, kwargs))
        return forward(*args, **kwargs)


# Keyword arguments through which transformers' decoder layers write to a KV cache.
_KV_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _without_kv_cache(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep a transformers KV cache out of a checkpointed layer, as transformers' own checkpointing does.

    The layer appends its keys and values to the cache, and the recompute in backward would append them
    again: attention then sees twice the keys (a shape error as soon as the batch has a padding mask), and
    the cache, held by the checkpoint, stays alive and doubled until backward ends. Training has no use
    for the cache. Layers that only read it say so with `_can_checkpoint_with_cache`.
    """
    if getattr(module, "_can_checkpoint_with_cache", False):
        return kwargs
    if not kwargs.get("use_cache") and all(kwargs.get(key) is None for key in _KV_CACHE_KWARGS):
        return kwargs
    kwargs = {key: None if key in _KV_CACHE_KWARGS else value for key, value in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return kwargs


def enable_activation_checkpointing(module: nn.Module) -> None:
    """Make `module` recompute its activations in backward (non-reentrant `torch.utils.checkpoint`)."""
    current = module.__dict__.get("forward")
    if isinstance(current, _CheckpointedForward):
        return
    # No Lightning or torch hook runs a forward under `checkpoint` (FSDP's policy adds a renaming wrapper).
    module.forward = _CheckpointedForward(module, current)


def disable_activation_checkpointing(module: nn.Module) -> None:
    current = module.__dict__.get("forward")
    if not isinstance(current, _CheckpointedForward):
        return
    if current.original is not None:
        module.forward = current.original
    else:
        del module.forward
