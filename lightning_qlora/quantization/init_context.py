"""Building a model straight into 4 bits, one linear layer at a time (`QLoRAPrecision`'s init contexts).

Inside the context each `nn.Linear` is quantized as it is attached to its parent module (torch's global
module-registration hook, which may return a replacement), right after its own constructor initialised
it, so the model never exists in full precision as a whole: one layer at a time. Whether `exclude` keeps a
layer is decided there from the name it is attached under (`lm_head`); a layer that a pattern could still
name once its full path is known (a glob, or a dotted pattern ending in that name) stays in full precision
and is quantized at setup, as a model built outside the context is.

Models that initialise their weights again after construction (transformers' `post_init`) call
`torch.nn.init` functions, or a tensor's `normal_` / `uniform_`, on weights that are 4-bit by then: a
torch-function mode catches those calls, runs the same initialiser on a full-precision scratch tensor of the
layer's shape and dtype (so the same random numbers are drawn in the same order) and quantizes that. The
4-bit layers so hold the bytes that building in full precision and quantizing afterwards gives.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_qlora._memory import release_freed_memory
from lightning_qlora.quantization.compute_dtype import resolve_compute_dtype
from lightning_qlora.quantization.config import QuantizationConfig
from lightning_qlora.quantization.cpu_allocator import lean_cpu_memory
from lightning_qlora.quantization.cpu_caching_allocator import release_cached
from lightning_qlora.quantization.layers import (
    KEEP_FULL_PRECISION_ATTR,
    SOURCE_DTYPE_ATTR,
    is_linear4bit,
    quantize_layer,
    set_full_precision_weight,
    to_linear4bit,
)

# Initialisers replayed on a scratch weight: those of torch.nn.init that dispatch on their tensor (passed by
# keyword, and seen before they read its shape; matched by name, since transformers swaps torch.nn.init's
# functions for guarded ones while it initialises), and the in-place methods that set a whole tensor from
# their arguments alone.
_DISPATCHING_INITIALISERS = frozenset({"uniform_", "normal_", "constant_", "kaiming_uniform_"})
_WHOLE_TENSOR_METHODS: frozenset[Callable[..., Any]] = frozenset(
    {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}
)
_SHAPE_QUERIES: frozenset[Callable[..., Any]] = frozenset(
    {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.shape.__get__}  # type: ignore[attr-defined]
)
# In-place methods that leave a tensor's values alone.
_HARMLESS_IN_PLACE = ("requires_grad_", "share_memory_", "retain_grad")
_GLOB_CHARACTERS = frozenset("*?[")


def exclusion(leaf: str, patterns: tuple[str, ...]) -> str:
    """What `patterns` say of a module attached as `leaf`, before its full path is known.

    "kept": a one-part pattern equal to `leaf` names it wherever it sits; "undecided": a dotted pattern
    ending in `leaf`, or a glob (which may span dots), might name it; "quantize": no pattern can.
    """
    if leaf in patterns:
        return "kept"
    if any(bool(_GLOB_CHARACTERS & set(p)) or p.rpartition(".")[2] == leaf for p in patterns):
        return "undecided"
    return "quantize"


class QuantizedInit:
    """Linear layers made inside are quantized in `config`'s format on the current default device.

    Attributes:
        compute_dtype: what the 4-bit layers dequantize into and compute in on that device (None on meta,
            where layers are left to be loaded: `load_quantized`).
        deferred: names of linear layers left in full precision because an `exclude` pattern might name
            them (decided at setup).
    """

    def __init__(
        self, config: QuantizationConfig, limit_cpu_heap: bool = True, caller: str = "QLoRAPrecision"
    ) -> None:
        if config.keep_sensitive:
            raise ValueError(
                f"{caller}(keep_sensitive={config.keep_sensitive:g}) measures each linear layer in full "
                "precision on a calibration batch, so the model cannot be built in 4 bits under init_module. "
                "Build it outside init_module (it is quantized at setup, after the measurement), or pass the "
                "layers to keep as exclude= (an earlier run's `sensitivity.kept_names`), keep_sensitive=0."
            )
        self.config = config
        self.device = torch.get_default_device()
        self.compute_dtype: torch.dtype | None = None  # on the meta device nothing is built, nor known
        if self.device.type != "meta":
            self.compute_dtype = resolve_compute_dtype(config.compute_dtype, self.device, config.backend)
        self.deferred: list[str] = []
        self.active = True
        self.internal = False  # quantizing: our own calls on packed weights are not the model's
        self._packed: dict[int, weakref.ref[nn.Module]] = {}  # storage address of a packed weight -> layer
        # packed weights a re-initialisation replaced (weak: once freed, their address may hold anything)
        self._retired: dict[int, weakref.ref[torch.Tensor]] = {}
        self._shape_read: set[int] = set()  # ids of layers whose packed weight's shape model code read
        # id of a full-precision layer -> (a weak reference to it, its 4-bit layer); weak, so that its
        # full-precision weight is freed, and checked, since a freed layer's id is reused
        self._replaced: dict[int, tuple[weakref.ref[nn.Module], nn.Module]] = {}
        self._hook: RemovableHandle | None = None
        self._mode = _ReinitMode(self)
        # the plugin's heap limit while building on a CPU: each layer's freed full-precision weight goes
        # back to the OS instead of staying in a heap fragmented by the packed weights between them
        self._lean_memory = lean_cpu_memory(limit_cpu_heap and self.device.type == "cpu")

    def __enter__(self) -> QuantizedInit:
        self._lean_memory.__enter__()
        # typed as returning None, but torch attaches the module the hook returns in place of the one given
        hook: Any = self._attached
        self._hook = nn.modules.module.register_module_module_registration_hook(hook)
        self._mode.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._mode.__exit__(kind, error, trace)
        if self._hook is not None:
            self._hook.remove()
        self._replaced.clear()
        self._lean_memory.__exit__(kind, error, trace)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Build in full precision for a while (Lightning's `configure_model`, quantized at setup)."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    def _attached(self, parent: nn.Module, name: str, module: nn.Module | None) -> nn.Module | None:
        """Registration hook: the 4-bit layer that replaces a linear layer being attached, or None."""
        if not self.active or not isinstance(module, nn.Linear):
            return None
        original, replacement = self._replaced.get(id(module), (None, None))
        if original is not None and original() is module:  # one layer attached twice stays one layer
            return replacement
        if (
            is_linear4bit(module)
            or isinstance(module.weight, nn.parameter.UninitializedParameter)  # LazyLinear: no weight yet
            or getattr(module, KEEP_FULL_PRECISION_ATTR, False)
            or not module.weight.is_floating_point()
            or module.weight.device.type == "meta"
        ):
            return None
        verdict = exclusion(name, self.config.exclude)
        if verdict != "quantize":
            if verdict == "undecided":
                self.deferred.append(name)
            return None
        self.internal = True
        try:
            layer = to_linear4bit(module, self.config, self.compute_dtype)
            quantize_layer(layer)
            self._track(layer)
        finally:
            self.internal = False
        release_cached()
        release_freed_memory()
        self._replaced[id(module)] = (weakref.ref(module), layer)
        return layer

    def _track(self, layer: nn.Module) -> None:
        self._packed[_address(layer.weight) or 0] = weakref.ref(layer)
        self._shape_read.discard(id(layer))

    def intercept(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Replay an initialiser on a 4-bit weight built here; refuse what cannot be replayed."""
        target = args[0] if args else kwargs.get("tensor")
        layer = self.owner(target)
        name = getattr(func, "__name__", "")
        if layer is not None:
            if not args and name in _DISPATCHING_INITIALISERS:
                return self.reinitialise(layer, func, args, kwargs)
            if func in _WHOLE_TENSOR_METHODS and id(layer) not in self._shape_read:
                return self.reinitialise(layer, func, args, kwargs)
            if func in _SHAPE_QUERIES:
                self._shape_read.add(id(layer))
                return func(*args, **kwargs)
        in_place = name.endswith("_") and not name.startswith("__") and name not in _HARMLESS_IN_PLACE
        writes = in_place or name.startswith("new_")  # new_tensor & co. would take the packed dtype
        if writes and (layer is not None or self._is_retired(target)):
            raise RuntimeError(
                f"`{name}` was called on a weight that QLoRAPrecision's init_module has already stored in "
                "4 bits (an initialiser at work?). Initialisers that dispatch on their tensor "
                "(torch.nn.init.normal_, uniform_, constant_, kaiming_uniform_) and a whole-tensor "
                "normal_/uniform_/zero_/fill_ that does not depend on the weight's shape are replayed on a "
                "full-precision copy; others (e.g. trunc_normal_, xavier_*, kaiming_normal_, orthogonal_) "
                "cannot be. Build the model outside init_module (QLoRAPrecision quantizes it at setup), or "
                "keep this layer with exclude=."
            )
        return func(*args, **kwargs)

    def _is_retired(self, tensor: object) -> bool:
        address = _address(tensor)
        ref = self._retired.get(address) if address is not None else None
        return ref is not None and ref() is not None

    def owner(self, tensor: object) -> nn.Module | None:
        """The layer built here whose packed weight `tensor` is (or views: `weight.data`)."""
        address = _address(tensor)
        ref = self._packed.get(address) if address is not None else None
        layer = ref() if ref is not None else None
        if layer is None or _address(layer.weight) != address:  # the address was reused
            return None
        return layer

    def reinitialise(self, layer: nn.Module, initialiser: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        """Run `initialiser` on a full-precision scratch weight in place of the 4-bit one, and quantize it."""
        linear: Any = layer
        dtype = getattr(layer, SOURCE_DTYPE_ATTR, torch.float32)
        scratch = torch.empty(
            linear.out_features, linear.in_features, dtype=dtype, device=linear.weight.device
        )
        if "tensor" in kwargs:  # torch.nn.init's functions pass their tensor by keyword
            kwargs = {**kwargs, "tensor": scratch}
        else:
            args = (scratch, *args[1:])
        initialiser(*args, **kwargs)
        old = linear.weight
        self._retired[_address(old) or 0] = weakref.ref(old)
        set_full_precision_weight(layer, scratch)
        del scratch
        quantize_layer(layer)
        self._track(layer)
        release_cached()
        release_freed_memory()
        weight: torch.Tensor = linear.weight
        return weight


class _ReinitMode(TorchFunctionMode):
    """Sends initialisers called on a 4-bit weight built here to `QuantizedInit.reinitialise`."""

    def __init__(self, building: QuantizedInit) -> None:
        super().__init__()
        self.building = building

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.building.active and not self.building.internal and (args or "tensor" in kwargs):
            return self.building.intercept(func, args, kwargs)
        return func(*args, **kwargs)


def _address(tensor: object) -> int | None:
    """Where a tensor's storage starts (shared by its views), or None for what has no storage."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return None
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses and sparse tensors without one
        return None
