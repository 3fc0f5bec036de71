"""`LoRA`: the Lightning Callback that injects adapters, freezes the base, and keeps checkpoints small."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_qlora._export_dir import check_export_dir
from lightning_qlora._logging import rank_zero_info, rank_zero_warn
from lightning_qlora._names import describe_names
from lightning_qlora._rng import capture_rng_state, restore_rng_state
from lightning_qlora._settings import SettingTypeError, check_bool, config_from, signature_with_fields
from lightning_qlora._train_mode import ensure_training
from lightning_qlora._trainer_settings import check_trainer_settings
from lightning_qlora.lora.adapter import adapter_modules, set_trainable_params
from lightning_qlora.lora.config import LoRACallbackSettings, LoRAConfig
from lightning_qlora.lora.guard import NonFiniteGuard, check_finite_state
from lightning_qlora.lora.inject import check_patterns, inject_adapters, mark_modules_to_save, summarize
from lightning_qlora.lora.resume_checks import CHECKPOINT_KEY, base_fingerprint, check_resume, resume_record
from lightning_qlora.precision import QLoRAPrecision
from lightning_qlora.quantization.config import DEFAULT_EXCLUDE, QuantizationConfig
from lightning_qlora.quantization.convert import NoLinearLayersError, iter_linear_layers
from lightning_qlora.quantization.layers import KEEP_FULL_PRECISION_ATTR
from lightning_qlora.resumable import warn_if_resume_is_not_exact
from lightning_qlora.strategies.fsdp_state import whole_trainable_parameters
from lightning_qlora.strategies.support import require_supported_strategy

_OWN = LoRACallbackSettings()  # the defaults of the callback's own arguments
_OWN_ARGUMENTS = tuple(f.name for f in fields(LoRACallbackSettings))
_EXPORT_DIR = "LoRA export_dir"


class LoRA(Callback):
    """Inject LoRA adapters into every linear layer (4-bit or not) and train only them.

    Works with `QLoRAPrecision` (QLoRA) or without it (plain LoRA in 32 or 16 bit), whether the
    LightningModule builds its model in `__init__` or in `configure_model`. Checkpoints written while it is
    active hold the trainable weights and the training state, not the frozen base.

    Args:
        config: the adapters' settings (`LoRAConfig`); its defaults are the QLoRA paper's (r=64, alpha=16,
            dropout 0.1, every linear layer but the LM head).
        export_dir: if set, the adapters are written there in PEFT's format when fit ends (rank 0 only). The
            folder is replaced as a whole, so it must be new, empty or an earlier export of this package
            (which leaves a `.lightning-qlora-export` marker); anything else is refused at once.
        export_module: attribute of the LightningModule that is the base model PEFT would wrap; by default
            its `model` attribute if there is one, else the LightningModule itself; "." names the
            LightningModule (for a head that lives outside `model`, so it is exported too).
        adapter_only_checkpoints: drop the frozen base from Lightning checkpoints.
        max_skipped_steps: optimizer steps with a NaN/inf loss or gradient that may be skipped before
            training stops with a `DivergenceError` (0, the default: stop at the first).
        **kwargs: fields of `LoRAConfig` (`r`, `alpha`, `dropout`, `target_modules`, `exclude`,
            `rank_pattern`, `alpha_pattern`, `use_rslora`, `modules_to_save`, `adapter_dtype`, `use_dora`,
            `variant`, `init`, `loftq_iter`), a shorthand: `LoRA(r=8)` is `LoRA(LoRAConfig(r=8))`; given with
            `config`, they replace its fields. `use_dora=True` trains DoRA (QDoRA over a 4-bit base);
            `variant="name"` any registered adapter variant (`lightning_qlora.lora.variants`);
            `init="loftq"` starts A and B from the quantization residual, quantizing each base with
            `QLoRAPrecision`'s format at injection (its full-precision weight is still there then).
    """

    def __init__(
        self,
        config: LoRAConfig | None = None,
        *,
        export_dir: str | os.PathLike[str] | None = _OWN.export_dir,
        export_module: str | None = _OWN.export_module,
        adapter_only_checkpoints: bool = _OWN.adapter_only_checkpoints,
        max_skipped_steps: int = _OWN.max_skipped_steps,
        **kwargs: Any,
    ) -> None:
        self.config = config_from(LoRAConfig, config, kwargs, "LoRA", _OWN_ARGUMENTS)
        if export_dir is not None and not isinstance(export_dir, (str, os.PathLike)):
            raise SettingTypeError(f"LoRA export_dir must be a path or None, got {export_dir!r}.")
        if export_module is not None and not isinstance(export_module, str):
            raise SettingTypeError(
                f"LoRA export_module must be an attribute name, '.' or None, got {export_module!r}."
            )
        self._check_exclude = tuple(self.config.exclude) != DEFAULT_EXCLUDE
        self.export_dir = check_export_dir(export_dir, _EXPORT_DIR) if export_dir is not None else None
        self.exported: Path | None = None  # the folder this callback's last fit wrote, if any
        self.export_module = export_module
        self.adapter_only_checkpoints = check_bool(
            "LoRA", "adapter_only_checkpoints", adapter_only_checkpoints
        )
        self.adapted: list[str] = []
        self._original_configure_model: Any = None
        self._patched_module: pl.LightningModule | None = None
        self.guard = NonFiniteGuard(max_skipped_steps)
        self._base_fingerprint: str | None = None
        self.quantization: QuantizationConfig | None = None  # QLoRAPrecision's format, read at setup
        self._precision: QLoRAPrecision | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_supported_strategy(trainer.strategy, "LoRA")
        if stage == "fit":
            check_trainer_settings(trainer.accumulate_grad_batches, trainer.gradient_clip_val, "Trainer ")
            self.exported = None
            if self.export_dir is not None:
                # again, now that the run folder is known (and in case the folder changed since construction)
                check_export_dir(
                    self.export_dir, _EXPORT_DIR, run_dir=trainer.default_root_dir, written=_written(trainer)
                )
        # LoftQ quantizes the base at injection, in the format the precision plugin would use after it.
        plugin = trainer.precision_plugin
        self._precision = plugin if isinstance(plugin, QLoRAPrecision) else None
        self.quantization = self._precision.config if self._precision is not None else None
        if is_overridden("configure_model", pl_module):
            self._inject_after_configure_model(pl_module)
        if any(True for _ in iter_linear_layers(pl_module)):
            self.inject(pl_module)
            self.check_export_module(pl_module)
        elif not is_overridden("configure_model", pl_module):
            raise NoLinearLayersError(
                f"{type(pl_module).__name__} has no torch.nn.Linear layer to adapt. Build the model in "
                "__init__ or in configure_model."
            )
        if self.adapter_only_checkpoints:
            pl_module.strict_loading = (
                False  # the frozen base is not in our checkpoints; adapters are checked
            )

    def inject(self, pl_module: nn.Module) -> list[str]:
        """Adapt `pl_module` now (idempotent): check patterns, wrap layers, freeze the rest, report."""
        check_patterns(pl_module, self.config, check_exclude=self._check_exclude)
        new = inject_adapters(pl_module, self.config, self._loftq_quantization(pl_module))
        set_trainable_params(pl_module)
        self._base_fingerprint = base_fingerprint(pl_module)  # before quantization, as on every resume
        if new:
            self.adapted.extend(new)
            rank_zero_info(summarize(pl_module).table())
        return new

    def _loftq_quantization(self, pl_module: nn.Module) -> QuantizationConfig | None:
        """The format LoftQ quantizes in: the plugin's, with the layers `keep_sensitive` keeps excluded.

        `keep_sensitive` must measure the full-precision model before LoftQ turns the adapted layers into
        4-bit ones, so with LoftQ it is measured here, at injection, rather than when the plugin converts.
        """
        if self.config.init != "loftq" or self._precision is None:
            return self.quantization
        unflagged = [m for m in pl_module.modules() if KEEP_FULL_PRECISION_ATTR not in vars(m)]
        mark_modules_to_save(pl_module, self.config)  # measured as the plugin sees the model: heads left out
        try:
            return self._precision.storage_config(pl_module)
        finally:  # inject_adapters flags them again (and unflags them if it refuses)
            for module in unflagged:
                vars(module).pop(KEEP_FULL_PRECISION_ATTR, None)

    def check_export_module(self, pl_module: nn.Module, built: bool = False) -> None:
        """Refuse an `export_module` that names no submodule now, not when fit ends and the work is done.

        A module that builds its model in `configure_model` is checked once that ran (`built`).
        """
        if self.export_module is None:
            return
        later = not built and isinstance(pl_module, pl.LightningModule)
        later = later and is_overridden("configure_model", pl_module)
        if later and not isinstance(getattr(pl_module, self.export_module, None), nn.Module):
            return  # not built yet: checked right after configure_model
        export_root(pl_module, self.export_module)

    def _inject_after_configure_model(self, pl_module: pl.LightningModule) -> None:
        """Models built in `configure_model` exist only after Callback.setup: adapt them right after."""
        if self._original_configure_model is not None:
            return
        original = pl_module.configure_model

        def configure_model_then_inject() -> None:
            original()
            self.inject(pl_module)
            self.check_export_module(pl_module, built=True)

        self._original_configure_model = original
        self._patched_module = pl_module
        pl_module.configure_model = configure_model_then_inject  # type: ignore[method-assign]

    def _restore_configure_model(self) -> None:
        """Give the module its own `configure_model` back; safe to call twice, or with nothing patched."""
        module = self._patched_module
        if module is not None and "configure_model" in module.__dict__:
            del module.configure_model  # drop the instance attribute: the class method shows through again
        self._patched_module = None
        self._original_configure_model = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_configure_model()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Lightning skips `teardown` when a stage raises: restore the module here too."""
        self._restore_configure_model()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.on_train_start(trainer, pl_module)
        adapted = [cast(nn.Module, m) for _, m in adapter_modules(pl_module)]
        ensure_training(pl_module, adapted, "LoRA", "adapts")
        warn_if_resume_is_not_exact(trainer)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self.guard.on_before_backward(trainer, pl_module, loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.guard.on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.guard.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        keep = trainable_state_keys(pl_module)
        trained = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        check_finite_state(trained, "a checkpoint")  # a diverged run never replaces a good checkpoint
        if self.adapter_only_checkpoints:
            checkpoint["state_dict"] = trained
        checkpoint[CHECKPOINT_KEY] = resume_record(self._base_fingerprint, trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        own_state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(own_state, Mapping):  # the settings first: they name the cause of any key mismatch
            self._check_same_config(own_state.get("config", {}))
        saved = set(checkpoint.get("state_dict", {}))
        trainable = trainable_state_keys(pl_module)
        model_keys = set(pl_module.state_dict(keep_vars=True))
        # Compared before the base fingerprint: adapters on other layers also change which weights are
        # frozen, and "other base weights" would name the wrong cause.
        unexpected = sorted(saved - model_keys)
        missing = sorted(trainable - saved)
        if unexpected:
            lacks = f", and lacks {describe_names(missing, 4)}" if missing else ""
            raise KeyError(
                f"The checkpoint holds {len(unexpected)} weight(s) this model does not have, e.g. "
                f"{describe_names(unexpected, 4)}{lacks}: it was written with other LoRA target modules "
                "(target_modules / exclude / modules_to_save) or another model. Resume with the settings it "
                "was trained with; nothing was loaded."
            )
        frozen = sorted(saved & model_keys - trainable)
        if frozen and self.adapter_only_checkpoints:
            raise KeyError(
                f"The checkpoint carries {len(frozen)} weight(s) of the frozen base, e.g. "
                f"{describe_names(frozen, 4)}; loading it would overwrite the base this run loaded. Resume "
                "an adapter-only checkpoint of this run, or pass adapter_only_checkpoints=False to resume a "
                "full one; nothing was loaded."
            )
        check_resume(checkpoint.get(CHECKPOINT_KEY), self._base_fingerprint, trainer)
        if missing:
            raise KeyError(
                f"The checkpoint lacks {len(missing)} trainable weight(s) of this model, e.g. {missing[:4]}: "
                "it was written with other LoRA targets or ranks, or without the LoRA callback."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        # The RNG state travels with the checkpoint so adapter dropout draws the same masks after a resume
        # as in an uninterrupted run: Lightning does not save it on its own.
        return {
            "config": asdict(self.config),
            "rng": capture_rng_state(),
            "guard": self.guard.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_same_config(state_dict.get("config", {}))
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])
        if "guard" in state_dict:
            self.guard.load_state_dict(state_dict["guard"])

    def _check_same_config(self, saved_config: Mapping[str, Any]) -> None:
        saved = _one_variant_field(saved_config)
        current = _one_variant_field(asdict(self.config))
        changed = {k: (saved[k], current[k]) for k in saved if k in current and saved[k] != current[k]}
        if changed:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"Resuming with a different LoRA configuration than the checkpoint's: {detail}.")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None:
            with whole_trainable_parameters(trainer.strategy, pl_module):  # sharded ("qlora_fsdp"): gathered
                self._export_at_fit_end(trainer, pl_module)

    def _export_at_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None and trainer.is_global_zero:
            from lightning_qlora.lora.peft_format import save_peft_adapter

            root = export_root(pl_module, self.export_module)
            _warn_about_trained_modules_outside(pl_module, root)
            trained = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
            check_finite_state(trained, f"the adapters to {self.export_dir}")
            path = save_peft_adapter(root, self.export_dir, self.config)
            self.exported = path
            rank_zero_info(f"LoRA: adapters written in PEFT format to {path}")
            if self.config.init == "loftq" and self.config.loftq_iter > 1:
                from lightning_qlora.lora.loftq import save_loftq_base

                base = save_loftq_base(root, path)
                rank_zero_info(
                    f"LoRA: after {self.config.loftq_iter} LoftQ rounds the 4-bit base is not the plain "
                    f"quantization of the model; it is written (dequantized) to {base}: load the adapters "
                    "onto that model."
                )


LoRA.__signature__ = signature_with_fields(LoRA.__init__, LoRAConfig)  # type: ignore[attr-defined]


def export_root(pl_module: nn.Module, attribute: str | None = None) -> nn.Module:
    """The module PEFT would wrap: keys in the export are relative to it."""
    if attribute == ".":
        return pl_module
    if attribute is not None:
        root = getattr(pl_module, attribute, None)
        if not isinstance(root, nn.Module):
            children = [name for name, _ in pl_module.named_children()]
            raise AttributeError(
                f"export_module={attribute!r} is not a submodule of {type(pl_module).__name__}; allowed: '.' "
                f"(the module itself), null (its `model`, if any) or one of {children}."
            )
        return root
    candidate = getattr(pl_module, "model", None)
    return candidate if isinstance(candidate, nn.Module) else pl_module


def _written(trainer: pl.Trainer) -> dict[str, str]:
    """The folders a fit writes into besides the run folder: checkpoints and the loggers' files."""
    folders: dict[str, str] = {}
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            folders[f"the checkpoint folder of {type(callback).__name__}"] = str(dirpath)
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, str) and log_dir:
            folders[f"the log folder of {type(logger).__name__}"] = log_dir
    return folders


def _warn_about_trained_modules_outside(pl_module: nn.Module, root: nn.Module) -> None:
    """Trained weights outside the exported module would silently be missing from the adapter folder."""
    inside = {id(p) for p in root.parameters()}
    outside = [name for name, p in pl_module.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        rank_zero_warn(
            f"LoRA export: trained weights {outside[:4]} lie outside the exported module "
            f"({type(root).__name__}) and are not in the adapter folder; pass export_module='.' to export "
            "relative to the LightningModule instead."
        )


def trainable_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of what training changes: trainable parameters, plus buffers of trained modules."""
    keys = {name for name, param in module.named_parameters() if param.requires_grad}
    for name, sub in module.named_modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            keys.update(f"{name}.{b}" if name else b for b, _ in sub.named_buffers(recurse=False))
    return keys


def _one_variant_field(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved or current config with `use_dora` and `variant` folded into the variant they name, so a
    checkpoint written with `use_dora=True` resumes under `variant="dora"` and the other way round."""
    folded = dict(config)
    use_dora = folded.pop("use_dora", False)
    variant = folded.pop("variant", None)
    folded["variant"] = "dora" if use_dora else (variant or "lora")
    return folded
