"""`QLoRAPrecision`: the Lightning Precision plugin that stores the frozen base in 4-bit NF4."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields, replace
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_qlora._logging import rank_zero_info
from lightning_qlora._settings import check_bool, config_from, signature_with_fields
from lightning_qlora.quantization import cpu_caching_allocator
from lightning_qlora.quantization.backends import get_backend
from lightning_qlora.quantization.compute_dtype import resolve_compute_dtype
from lightning_qlora.quantization.config import PrecisionPluginSettings, QuantizationConfig, torch_dtype
from lightning_qlora.quantization.convert import replace_linear_layers, set_compute_dtype
from lightning_qlora.quantization.cpu_allocator import start_lean_cpu_memory
from lightning_qlora.quantization.init_context import QuantizedInit
from lightning_qlora.quantization.layers import is_linear4bit, is_quantized_weight, quantize_layer
from lightning_qlora.quantization.report import QuantizationReport, quantization_report
from lightning_qlora.quantization.sensitivity import SensitivityChoice
from lightning_qlora.strategies.support import require_supported_strategy

_OWN = PrecisionPluginSettings()  # the defaults of the plugin's own arguments
_OWN_ARGUMENTS = tuple(f.name for f in fields(PrecisionPluginSettings))


class QLoRAPrecision(Precision):
    """Quantize every linear layer of the model to 4-bit (NF4 + double quantization by default) at setup.

    Unlike Lightning's `BitsandbytesPrecision` this runs on CPU as well as CUDA, leaves LoRA adapters and
    `modules_to_save` untouched, and loads its own state dicts back. Weights that already sit on an
    accelerator are quantized in `convert_module`; weights on the CPU are quantized when the strategy moves
    the model to its device, so a CPU-built model that trains on CUDA is quantized on CUDA and never exists
    there in full precision.

    Under `trainer.init_module()` (or Fabric's `init_module()`) the model is built directly in 4 bits, each
    linear layer quantized as it is attached to its parent, so the whole model never exists in full
    precision (`QuantizedInit`; not with `keep_sensitive`, which measures full-precision layers).

    Args:
        config: the storage format (`QuantizationConfig`); its defaults are the paper's (NF4, blocksize 64,
            double quantization, compute dtype "auto", the LM head kept in full precision).
        log_report: log a table of what was quantized at setup (rank 0 only).
        limit_cpu_heap: on a CPU (Linux, glibc), have allocations of 1 MiB and more returned to the OS when
            freed (malloc's mmap threshold, set once for the process), so each step's activations do not
            pile up in the heap: about half the anonymous memory of a training process; and torch's CPU
            tensors of 128 KiB and more served by a caching allocator that reuses up to 64 MiB of freed
            blocks, so they are not faulted in afresh (built at first use with the C++ compiler; without
            one, the threshold alone). The caching allocator is process-wide but only while a
            fit/validate/test/predict runs: the previous one is put back at teardown (docs/native-code.md).
            False leaves the allocator alone; `MALLOC_MMAP_THRESHOLD_` in the environment always wins.
        **kwargs: fields of `QuantizationConfig` (`quant_type`, `blocksize`, `double_quant`,
            `compute_dtype`, `exclude`, `backend`, `keep_sensitive`), a shorthand:
            `QLoRAPrecision(quant_type="fp4")` is
            `QLoRAPrecision(QuantizationConfig(quant_type="fp4"))`; given with `config`, they replace its
            fields.
    """

    # The parts that are not quantized (adapters, norms, embeddings) train in full precision.
    precision = "32-true"

    def __init__(
        self,
        config: QuantizationConfig | None = None,
        *,
        log_report: bool = _OWN.log_report,
        limit_cpu_heap: bool = _OWN.limit_cpu_heap,
        **kwargs: Any,
    ) -> None:
        self.config = config_from(QuantizationConfig, config, kwargs, "QLoRAPrecision", _OWN_ARGUMENTS)
        get_backend(self.config.backend)  # a missing library fails here, with the fix, before any work
        self.log_report = check_bool("QLoRAPrecision", "log_report", log_report)
        self.limit_cpu_heap = check_bool("QLoRAPrecision", "limit_cpu_heap", limit_cpu_heap)
        self.report: QuantizationReport | None = None
        self._compute_dtype: torch.dtype | None = None
        self._building: QuantizedInit | None = None  # the init_module context being entered
        self._holds_allocator = False  # the caching allocator is installed for this run, until teardown
        self.calibration_batch: Any = None
        """The batch `keep_sensitive` measures layers on, passed to the module's `training_step` as is; set it
        before `fit` (None: the first batch of the training data). Not a constructor argument: a batch is
        not a command-line setting."""
        self.sensitivity: SensitivityChoice | None = None
        """With `keep_sensitive`: every layer's measured effect and the layers kept in full precision."""

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the 4-bit layers dequantize into and compute in.

        Fixed once the device is known (at `init_module` or at setup); before that the configured dtype if
        it is explicit, None for "auto" (it depends on the device).
        """
        if self._compute_dtype is not None:
            return self._compute_dtype
        requested = self.config.compute_dtype
        return requested if isinstance(requested, torch.dtype) else torch_dtype(requested)

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        """What `trainer.init_module()` enters (on the root device): linear layers made inside are built in
        4 bits. Lightning enters it around `configure_model` too, where `module_init_context` pauses it."""
        return self._build_in_4bit()

    @override
    def module_init_context(self) -> AbstractContextManager:
        """What Fabric's `init_module()` enters: linear layers made inside are built in 4 bits.

        The Trainer enters it around `configure_model` inside `tensor_init_context`; there it pauses the
        4-bit build, so a model made in `configure_model` is quantized at setup as before (LoftQ and
        `keep_sensitive` need its full-precision weights then).
        """
        if self._building is not None:
            return self._building.paused()
        return self._build_in_4bit()

    @contextmanager
    def _build_in_4bit(self) -> Iterator[None]:
        with QuantizedInit(self.config, self.limit_cpu_heap) as building:
            self._building = building
            self._compute_dtype = building.compute_dtype or self._compute_dtype
            try:
                yield
            finally:
                self._building = None
        if building.deferred:
            rank_zero_info(
                f"QLoRAPrecision: {len(building.deferred)} linear layer(s) an exclude pattern might name "
                f"({', '.join(sorted(set(building.deferred))[:4])}) were built in full precision; those the "
                "patterns do not keep are quantized at setup (one-part patterns such as lm_head are decided "
                "as each layer is built)."
            )

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        trainer = getattr(module, "_trainer", None)  # a LightningModule attached to a Trainer
        if trainer is not None:
            require_supported_strategy(trainer.strategy, "QLoRAPrecision")
        device = _accelerator_device(module)
        compute_dtype = None
        if device is not None:
            compute_dtype = resolve_compute_dtype(self.config.compute_dtype, device, self.config.backend)
        replace_linear_layers(
            module,
            self.storage_config(module),
            compute_dtype=compute_dtype,
            device=device,
            quantize_now=device is not None,
        )
        return module

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Runs after the model reached its device: finish quantizing, fix the compute dtype, report."""
        layers = [m for m in model.modules() if isinstance(m, nn.Linear) and is_linear4bit(m)]
        for layer in layers:
            quantize_layer(layer)
        if layers:
            device = layers[0].weight.device
            self._compute_dtype = resolve_compute_dtype(
                self.config.compute_dtype, device, self.config.backend
            )
            set_compute_dtype(model, self._compute_dtype)
            if self.limit_cpu_heap and device.type == "cpu" and not self._holds_allocator:
                self._holds_allocator = start_lean_cpu_memory()
        _refuse_training_quantized_weights(model, optimizers)
        self.report = quantization_report(model)
        if self.sensitivity is not None:
            self.report = replace(self.report, sensitivity=self.sensitivity)
        if self.log_report:
            rank_zero_info(
                f"QLoRAPrecision: {self.config.quant_type.upper()}"
                f"{' + double quantization' if self.config.double_quant else ''}, blocksize "
                f"{self.config.blocksize}, compute dtype {str(self.compute_dtype).removeprefix('torch.')}\n"
                + self.report.table()
            )
        return super().connect(model, optimizers, lr_schedulers)

    @override
    def teardown(self) -> None:
        """Put back the CPU allocator that was installed before this run (the caching one is a guest)."""
        if self._holds_allocator:
            self._holds_allocator = False
            cpu_caching_allocator.uninstall()
        super().teardown()

    def storage_config(self, module: nn.Module) -> QuantizationConfig:
        """The config `module` is stored with: with `keep_sensitive`, the layers kept added to `exclude`.

        The first call measures (on `module` in full precision); later ones reuse that measurement. The
        LoRA callback calls it before LoftQ quantizes the adapted layers, so LoftQ leaves the kept ones be.
        """
        if self.config.keep_sensitive == 0:
            return self.config
        if self.sensitivity is None:  # measured once: a later stage's setup must not re-measure a 4-bit model
            self.sensitivity = measure_for_keep_sensitive(module, self.config, self.calibration_batch)
        return replace(
            self.config, keep_sensitive=0.0, exclude=(*self.config.exclude, *self.sensitivity.kept_names)
        )


QLoRAPrecision.__signature__ = signature_with_fields(  # type: ignore[attr-defined]
    QLoRAPrecision.__init__, QuantizationConfig
)


def _refuse_training_quantized_weights(model: nn.Module, optimizers: list[Optimizer]) -> None:
    """An optimizer over 4-bit weights with no adapters in the model would train nothing that matters.

    The packed 4-bit weights are frozen (they have no gradient), so without LoRA adapters beside them only
    the biases and norms would change, silently: say so before the first step.
    """
    from lightning_qlora.lora.adapter import is_adapter

    quantized = {
        id(p)
        for opt in optimizers
        for group in opt.param_groups
        for p in group["params"]
        if is_quantized_weight(p)
    }
    if not quantized or any(is_adapter(m) for m in model.modules()):
        return
    names = [name for name, p in model.named_parameters() if id(p) in quantized]
    raise ValueError(
        f"The optimizer holds {len(quantized)} 4-bit weight(s) of QLoRAPrecision's quantized linear layers "
        f"(e.g. {names[:3]}), which are frozen: 4-bit storage has no gradient, so only the rest of the model "
        "would train. Add the LoRA callback (`Trainer(callbacks=[LoRA()])`) to train adapters beside them, "
        "or train without QLoRAPrecision."
    )


def measure_for_keep_sensitive(
    module: nn.Module, config: QuantizationConfig, batch: Any = None
) -> SensitivityChoice:
    """Measure each layer `config` would quantize on `batch` (default: the first training batch)."""
    from lightning_qlora.lora.adapter import adapter_params
    from lightning_qlora.quantization.calibration import first_training_batch, training_step_loss
    from lightning_qlora.quantization.convert import quantization_targets
    from lightning_qlora.quantization.sensitivity import choose_sensitive_layers

    targets = quantization_targets(module, replace(config, keep_sensitive=0.0))
    adapters = list(adapter_params(module).values())  # the budget is a share of the model, not of them
    if not targets:
        return choose_sensitive_layers(module, [], config, lambda: 0.0, not_counted=adapters)
    device = targets[0][1].weight.device
    batch = first_training_batch(module) if batch is None else batch
    loss = training_step_loss(module, batch, device)
    return choose_sensitive_layers(module, targets, config, loss, not_counted=adapters)


def _accelerator_device(module: nn.Module) -> torch.device | None:
    """The accelerator the linear weights already live on (a model built in `configure_model`), if any."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and sub.weight.device.type not in ("cpu", "meta"):
            device: torch.device = sub.weight.device
            return device
    return None
