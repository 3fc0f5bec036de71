"""`QLoRAFSDPStrategy`: the QLoRA recipe with the 4-bit model sharded across processes by FSDP2.

DDP copies the whole 4-bit model into every process; here each process keeps 1/N of every layer's packed
weights (and of the adapters and their optimizer state) and gathers a layer's weights only while that
layer computes. PyTorch's own FSDP2 (`fully_shard`) does the sharding, through Lightning's
`ModelParallelStrategy` (data-parallel size = world size, no tensor parallelism).

The packed 4-bit weights are uint8 parameters. FSDP2 gathers a unit whose parameters have several dtypes
as raw bytes (uint8), and a uint8-only unit as uint8: either way the packed codes are copied, never cast,
so every byte comes back as it was (tests/strategies/test_fsdp_bytes.py gathers all 256 values in every
position and every bf16 NaN pattern). The quant state (absmax, code book, nested statistics) is small and
stays replicated on the module; bitsandbytes re-wraps the gathered bytes around it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from typing_extensions import override

from lightning_qlora._logging import rank_zero_info
from lightning_qlora._settings import check_bool
from lightning_qlora.strategies.fsdp_adopt import adopting_row_shards
from lightning_qlora.strategies.fsdp_optim import shard_local_steps
from lightning_qlora.strategies.fsdp_state import (
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
)
from lightning_qlora.strategies.hook import (
    ActivationCheckpointing,
    _check_activation_checkpointing_spec,
    _PagedOptimizerMixin,
    activation_checkpoint_targets,
)
from lightning_qlora.strategies.optim import OptimizerConfig, StrategySettings

_DEFAULTS = StrategySettings()


class QLoRAFSDPStrategy(_PagedOptimizerMixin, ModelParallelStrategy):
    """The QLoRA recipe over several processes (and machines), each holding a shard of the 4-bit model.

    `Trainer(devices=N, num_nodes=M, plugins=[QLoRAPrecision()], callbacks=[LoRA()], strategy="qlora_fsdp")`.
    Each decoder layer becomes one FSDP2 unit (gathered for its forward and again for its backward, then
    freed), the rest of the model the root unit. Gradients of the adapters are reduce-scattered, so each
    process steps only its shard of them. Checkpoints and PEFT exports are the single-process ones (written
    by rank 0 from gathered tensors), so a run can resume on another number of processes.

    Args:
        optimizer, force_optimizer, max_grad_norm, activation_checkpointing: as for `QLoRAStrategy`. 8-bit
            optimizer states are refused: their block-wise statistics cannot be split between processes.
        shard: the module classes (or class names) that become FSDP units; None: the
            `activation_checkpointing` classes if given, else the model's `_no_split_modules` (transformers'
            decoder layers), else only the root unit (everything gathered at once: no memory saving).
        reshard_after_forward: free a unit's gathered weights after its forward (gathered again for
            backward); False keeps them until backward: faster, more memory.
        data_parallel_size: the number of processes sharing the model; "auto" (or the world size).
        tensor_parallel_size: must be 1 (tensor parallelism over 4-bit weights is not supported).
        cpu_offload: not supported (refused): bitsandbytes' 4-bit matmul needs the weights on the device.
        mp_policy: an FSDP2 `MixedPrecisionPolicy` with `param_dtype` left None (a param_dtype would cast
            the packed 4-bit bytes as numbers); `QLoRAPrecision(compute_dtype=...)` sets the compute dtype.
        process_group_backend, timeout: as for Lightning's `ModelParallelStrategy`.
        **optimizer_kwargs: fields of `OptimizerConfig`, as for `QLoRAStrategy`.
    """

    strategy_name = "qlora_fsdp"
    shards_4bit_weights = True  # read by `support.require_supported_strategy`

    def __init__(
        self,
        optimizer: OptimizerConfig | dict[str, Any] | None = None,
        force_optimizer: bool = _DEFAULTS.force_optimizer,
        max_grad_norm: float | None = _DEFAULTS.max_grad_norm,
        activation_checkpointing: ActivationCheckpointing = None,
        shard: ActivationCheckpointing = None,
        reshard_after_forward: bool = True,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        cpu_offload: bool = False,
        mp_policy: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **optimizer_kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if tensor_parallel_size not in (1, "auto"):
            raise ValueError(
                f"{name}(tensor_parallel_size={tensor_parallel_size!r}): tensor parallelism over 4-bit "
                "weights is not supported; allowed: 1 (every process holds a shard of every layer, FSDP2)."
            )
        if data_parallel_size != "auto" and (
            not isinstance(data_parallel_size, int) or data_parallel_size < 1
        ):
            raise ValueError(
                f"{name}(data_parallel_size={data_parallel_size!r}): allowed: 'auto' or an int >= 1."
            )
        if check_bool(name, "cpu_offload", cpu_offload):
            raise ValueError(
                f"{name}(cpu_offload=True) is not supported: FSDP2 would keep the shards on the CPU and "
                "gather them to the device, but bitsandbytes keeps each 4-bit weight's quant state on the "
                "module's device. Use more processes (devices/num_nodes) to lower the memory per process."
            )
        if mp_policy is not None and getattr(mp_policy, "param_dtype", None) is not None:
            raise ValueError(
                f"{name}(mp_policy=MixedPrecisionPolicy(param_dtype={mp_policy.param_dtype})): FSDP2 would "
                "cast every parameter to that dtype before gathering it, the packed 4-bit weights (uint8 "
                "storage) included, which turns their bytes into other numbers. Leave param_dtype None; "
                "the 4-bit layers compute in QLoRAPrecision(compute_dtype=...)."
            )
        _check_activation_checkpointing_spec(shard)
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.shard = shard
        self.reshard_after_forward = check_bool(name, "reshard_after_forward", reshard_after_forward)
        self.mp_policy = mp_policy
        self._init_qlora(
            optimizer, optimizer_kwargs, force_optimizer, max_grad_norm, activation_checkpointing
        )
        self._units: list[nn.Module] = []

    @override
    def setup_environment(self) -> None:
        world_size = self.num_nodes * self.num_processes
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world_size
        if self._data_parallel_size != world_size:
            raise ValueError(
                f"{type(self).__name__}(data_parallel_size={self._data_parallel_size}) must equal the world "
                f"size ({self.num_nodes} node(s) x {self.num_processes} process(es) = {world_size}): every "
                "process holds a shard of the model; leave it 'auto'."
            )
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Checkpoint activations, then quantize, move and shard one unit at a time, then build the optimizer.

        Lightning's `ModelParallelStrategy.setup` asks the user to shard in `configure_model` and moves the
        whole model to the device first; here the strategy shards, unit by unit, so a model loaded on the CPU
        reaches the device one layer at a time and is never whole there.
        """
        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        _check_storage(self.model, type(self).__name__)
        if self.activation_checkpointing is not None:
            self._apply_activation_checkpointing(self.model)
        self._shard_model(self.model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard_model(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        if self._units:
            return  # a second fit/validate on the same module: already sharded
        mesh = self.device_mesh["data_parallel"]
        options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.mp_policy is not None:
            options["mp_policy"] = self.mp_policy
        spec = self._unit_spec(model)
        layers = activation_checkpoint_targets(model, spec) if spec is not None else []
        device = self.root_device
        name = type(self).__name__

        def shard(unit: nn.Module, managed: list[nn.Module]) -> None:
            # parameters loaded with load_quantized(shard=...) hold this process's rows already: adopted
            with adopting_row_shards(managed, mesh.size(), device, name):
                _move_to(unit, device)
                fully_shard(unit, **options)

        for layer in layers:
            _quantize_pending(layer, device)  # a CPU weight is quantized on the device (as with "qlora")
            shard(layer, list(layer.modules()))  # the whole layer is dropped: this process keeps its rows
        inside = {id(sub) for layer in layers for sub in layer.modules()}
        outside = [sub for sub in model.modules() if id(sub) not in inside]
        for sub in outside:
            _quantize_pending(sub, device, recurse=False)
            with adopting_row_shards([sub], mesh.size(), device, name):
                _move_to(sub, device, recurse=False)  # its own tensors only
        leaves = _full_precision_leaves(model, layers)
        for leaf in leaves:
            shard(leaf, [leaf])
        inside.update(id(leaf) for leaf in leaves)
        roots = _root_units(model, [*layers, *leaves])
        for root in roots:
            shard(root, [sub for sub in root.modules() if id(sub) not in inside])
            _gather_root_for_direct_calls(root, inside)
        self._units = [*layers, *leaves, *roots]
        classes = sorted({type(m).__name__.removeprefix("FSDP") for m in layers})
        rank_zero_info(
            f"{type(self).__name__}: {len(layers)} layer unit(s)"
            f"{' of class ' + ', '.join(classes) if classes else ''}, {len(leaves)} embedding/full-precision "
            f"linear unit(s) and {len(roots)} root unit(s) sharded across {mesh.size()} process(es) (FSDP2)."
        )

    def _unit_spec(self, model: nn.Module) -> ActivationCheckpointing:
        if self.shard is not None:
            return self.shard
        if self.activation_checkpointing is not None:
            return self.activation_checkpointing
        names: set[str] = set()
        for sub in model.modules():
            names.update(getattr(sub, "_no_split_modules", None) or ())
        present = {type(m).__name__ for m in model.modules()}
        found = sorted(names & present)
        return found or None

    @override
    def _build_optimizer(
        self, trainer: pl.Trainer, module: pl.LightningModule
    ) -> tuple[Optimizer, LambdaLR | None]:
        if "8bit" in self.optimizer_config.name:
            raise ValueError(
                f"{type(self).__name__}: optimizer {self.optimizer_config.name!r} keeps block-wise 8-bit "
                "states that cannot be split between processes; allowed with qlora_fsdp: paged_adamw, "
                "paged_adamw_32bit, adamw."
            )
        optimizer, scheduler = super()._build_optimizer(trainer, module)
        return shard_local_steps(optimizer), scheduler

    # --- checkpoints: the single-process layout, gathered to rank 0 -------------------------------------

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Whole tensors under the model's keys; only the trained ones when LoRA writes adapter-only
        checkpoints (so the 4-bit base is never gathered for a checkpoint)."""
        module = self.lightning_module
        assert module is not None
        keep = _adapter_only_keys(module)
        state = full_state_dict(module, None if keep is None else keep.__contains__)
        return state if self.is_global_zero else {}

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        unknown = load_full_state_dict(module, checkpoint["state_dict"])
        if unknown and strict and module.strict_loading:
            raise KeyError(f"Unexpected key(s) in the checkpoint's state_dict: {unknown[:8]}")

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        return full_optimizer_state(inner)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            load_full_optimizer_state(optimizer, state)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Every rank reads the single-file checkpoint (rank 0's path) and keeps its rows of each tensor."""
        path = self.broadcast(checkpoint_path)
        return ParallelStrategy.load_checkpoint(self, path, weights_only=weights_only)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        ParallelStrategy.save_checkpoint(self, checkpoint, self.broadcast(filepath), storage_options)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="FSDP2-sharded 4-bit model, paged AdamW over the LoRA adapters (QLoRA)",
            )


def _quantize_pending(model: nn.Module, device: torch.device, recurse: bool = True) -> None:
    """Pack the 4-bit layers before sharding: FSDP2 shards the packed bytes, never a pending weight."""
    from lightning_qlora.quantization.layers import is_linear4bit, is_quantized, quantize_layer

    for sub in model.modules() if recurse else [model]:
        if is_linear4bit(sub) and not is_quantized(sub):
            quantize_layer(sub, device)


def _move_to(module: nn.Module, device: torch.device, recurse: bool = True) -> None:
    """`module.to(device)`, leaving meta tensors (the placeholders of adopted shards) alone; nothing is
    applied to a module already there (`_apply` would swap its DTensor parameters for themselves).

    A torchmetrics ``Metric`` (a task's validation metrics) overrides ``_apply`` without ``recurse`` and
    keeps its states outside ``_parameters``/``_buffers``: its own ``_apply`` moves them and its children.
    """

    def move(t: torch.Tensor) -> torch.Tensor:
        return t if t.is_meta or t.device == device else t.to(device)

    if "recurse" not in inspect.signature(module._apply).parameters:
        module._apply(move)
        return
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    if any(not t.is_meta and t.device != device for t in tensors):
        module._apply(move, recurse=recurse)


def _check_storage(model: nn.Module, owner: str) -> None:
    """The byte-exact gather is proven for uint8 storage; other storage dtypes are refused before work."""
    from lightning_qlora.quantization.layers import is_linear4bit, is_quantized

    def storage(layer: nn.Module) -> torch.dtype:
        weight = cast(torch.Tensor, layer.weight)
        dtype = weight.dtype if is_quantized(layer) else getattr(weight, "quant_storage", weight.dtype)
        return cast(torch.dtype, dtype)

    wrong = [
        (name, storage(sub))
        for name, sub in model.named_modules()
        if is_linear4bit(sub) and storage(sub) != torch.uint8
    ]
    if wrong:
        name, dtype = wrong[0]
        raise ValueError(
            f"{owner}: the 4-bit weight of {name!r} is stored as {dtype} ({len(wrong)} layer(s) in all); "
            "qlora_fsdp shards packed 4-bit weights stored as torch.uint8 (QLoRAPrecision's layers), whose "
            "bytes FSDP2 gathers unchanged. Quantize the model with QLoRAPrecision (or quant_storage=uint8)."
        )


def _full_precision_leaves(model: nn.Module, layers: Sequence[nn.Module]) -> list[nn.Module]:
    """Embeddings and full-precision linear layers outside the layer units, each made a unit of its own.

    They are the largest full-precision weights (a vocabulary-sized embedding and LM head); in the root unit,
    which FSDP2 keeps gathered from forward to backward, they would be whole in every process for the whole
    step. A module whose weight it shares with another (tied embeddings) stays in the root unit.
    """
    from lightning_qlora.quantization.layers import is_linear4bit

    inside = {id(sub) for layer in layers for sub in layer.modules()}
    owners: dict[int, int] = {}
    for sub in model.modules():
        for param in sub.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    leaves = []
    for sub in model.modules():
        if id(sub) in inside or list(sub.children()):
            continue
        plain_linear = isinstance(sub, nn.Linear) and not is_linear4bit(sub)
        params = list(sub.parameters(recurse=False))
        unshared = all(owners[id(p)] == 1 for p in params)
        if (isinstance(sub, nn.Embedding) or plain_linear) and params and unshared:
            leaves.append(sub)
    return leaves


def _root_units(model: nn.Module, layers: Sequence[nn.Module]) -> list[nn.Module]:
    """The modules that hold the parameters outside the layer units: the LightningModule's children.

    Lightning calls `training_step`, not the LightningModule's `forward`, so the root unit is each child
    module that holds such parameters (FSDP2 gathers a unit in its forward hooks). Containers without a
    forward of their own (ModuleList, ModuleDict) are looked into.
    """
    inside_layers = {id(p) for layer in layers for p in layer.parameters()}
    direct = [name for name, _ in model.named_parameters(recurse=False)]
    if direct:
        raise ValueError(
            f"qlora_fsdp shards submodules; {type(model).__name__} holds parameters itself ({direct[:4]}). "
            "Move them into a submodule (e.g. an nn.Module attribute called from training_step)."
        )

    def holds_own(module: nn.Module) -> bool:
        return any(id(p) not in inside_layers for p in module.parameters())

    roots: list[nn.Module] = []
    pending = list(model.children())
    while pending:
        child = pending.pop(0)
        if not holds_own(child):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            pending = list(child.children()) + pending
        else:
            roots.append(child)
    return roots


def _gather_root_for_direct_calls(root: nn.Module, inside: set[int]) -> None:
    """Make the root unit's parameters usable when a submodule is called without the root's forward.

    FSDP2 gathers a unit in its own forward hooks, and the first unit to run forward becomes the root of
    the units below it. A task may call parts of the model directly (the chunked loss calls the decoder,
    then the LM head, never the causal LM's forward): the root's parameters that those parts own (the
    final norm, tied embeddings) would stay sharded, and the first layer to run would become a root (never
    resharded after forward). So the root is initialised now, whatever runs first, and each module that
    owns root parameters gathers the root before its own forward (a no-op once gathered; FSDP2 reshards
    the root after backward, as when the root's own forward ran).
    """
    owners = [
        sub
        for sub in root.modules()
        if sub is not root and id(sub) not in inside and any(True for _ in sub.parameters(recurse=False))
    ]
    unit = cast(Any, root)
    unit._get_fsdp_state()._lazy_init()  # FSDP2 offers no public call; its forward would do this first
    for sub in owners:
        sub.register_forward_pre_hook(lambda *_: unit.unshard())


def _adapter_only_keys(module: pl.LightningModule) -> set[str] | None:
    """The trained keys when the LoRA callback drops the frozen base from checkpoints, else None."""
    from lightning_qlora.lora.callback import LoRA, trainable_state_keys

    trainer = module._trainer
    callbacks: Sequence[Any] = trainer.callbacks if trainer is not None else []  # type: ignore[attr-defined]
    if any(isinstance(c, LoRA) and c.adapter_only_checkpoints for c in callbacks):
        return trainable_state_keys(module)
    return None
