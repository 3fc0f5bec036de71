"""Loading full-precision weights into a model and quantizing each linear weight as it arrives.

The model is built without real weights (on the meta device, or under `Trainer.init_module(empty_init=True)`
of a Trainer without `QLoRAPrecision`, whose `init_module` builds the linear layers in 4 bits itself);
tensors are then read one at a time from a safetensors file (memory-mapped) or a state dict, so peak memory
stays near the quantized model plus one layer instead of the full-precision model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_qlora._logging import rank_zero_info
from lightning_qlora._memory import release_freed_memory
from lightning_qlora._modules import set_submodule
from lightning_qlora._names import BASE_LAYER, describe_names
from lightning_qlora._settings import SettingTypeError, check_bool
from lightning_qlora.quantization.config import PrecisionPluginSettings, QuantizationConfig
from lightning_qlora.quantization.convert import (
    quantization_targets,
    refuse_unmeasured_keep_sensitive,
    require_linear_layers,
    set_compute_dtype,
)
from lightning_qlora.quantization.cpu_allocator import lean_cpu_memory
from lightning_qlora.quantization.cpu_caching_allocator import release_cached
from lightning_qlora.quantization.layers import (
    is_quantized,
    quantize_layer,
    set_full_precision_weight,
    to_linear4bit,
)
from lightning_qlora.quantization.meta_buffers import MetaBufferError, restore_non_persistent_buffers
from lightning_qlora.quantization.row_shards import keep_rows, shard_mesh

StateSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, torch.Tensor]


def load_quantized(
    model: nn.Module,
    source: StateSource,
    config: QuantizationConfig | None = None,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    key_map: Callable[[str], str | None] | None = None,
    limit_cpu_heap: bool = PrecisionPluginSettings.limit_cpu_heap,
    shard: Any = None,
) -> list[str]:
    """Fill `model` from `source`, quantizing the selected linear weights layer by layer on `device`.

    `source` is a safetensors file, a list of shard files, a folder holding `*.safetensors`, or a state
    dict. `dtype` casts the floating tensors that stay in full precision. `key_map` renames source keys
    (return None to skip one). Returns the names of the quantized layers.

    `limit_cpu_heap` (on a CPU device) sets `QLoRAPrecision`'s heap limit before the first tensor is read
    (the caching allocator is installed for the load and the previous one put back after it):
    loading's megabyte-size temporaries then go back to the OS instead of leaving the heap full of free
    blocks that training's activations refill, leaving training's peak to chance (benchmarks/README.md).

    `shard` (a torch `DeviceMesh`: under `strategy="qlora_fsdp"`, the LightningModule's `self.device_mesh`
    in `configure_model`) makes every process keep only the rows of each parameter that FSDP2 gives it: each
    linear weight is still quantized whole (its statistics need every value), then all but this process's
    rows of its packed bytes are dropped at once. So no process holds the whole 4-bit model, and the
    strategy adopts the shards without a gather (docs/sharded.md). Without it, every process loads all.
    """
    limit_cpu_heap = check_bool("load_quantized", "limit_cpu_heap", limit_cpu_heap)
    if config is not None and not isinstance(config, QuantizationConfig):
        hint = f" (e.g. QuantizationConfig(quant_type={config!r}))" if isinstance(config, str) else ""
        raise SettingTypeError(
            f"load_quantized config must be a QuantizationConfig or None (NF4 with double quantization), "
            f"got {config!r}{hint}."
        )
    config = config or QuantizationConfig()
    refuse_unmeasured_keep_sensitive(config, "load_quantized (which never holds the full-precision model)")
    device = torch.device(device)
    mesh = shard_mesh(shard, device) if shard is not None else None
    require_linear_layers(model)
    with lean_cpu_memory(limit_cpu_heap and device.type == "cpu"):
        return _load(model, source, config, device, compute_dtype, dtype, strict, key_map, mesh)


def _load(
    model: nn.Module,
    source: StateSource,
    config: QuantizationConfig,
    device: torch.device,
    compute_dtype: torch.dtype | None,
    dtype: torch.dtype | None,
    strict: bool,
    key_map: Callable[[str], str | None] | None,
    mesh: Any = None,
) -> list[str]:
    aliases = _tied_names(model)  # before the 4-bit shells replace (and so untie) a tied linear layer
    targets = _untied(quantization_targets(model, config), aliases)
    shells = {path: _shell(layer, config, compute_dtype) for path, layer in targets}
    for path, shell in shells.items():
        set_submodule(model, path, shell)

    expected = dict(_named_tensors(model))
    loaded: set[str] = set()
    unexpected: list[str] = []
    for key, read in _iter_source(source):
        name: str | None = key_map(key) if key_map else key
        if name is None:
            continue
        target = _resolve(name, expected)
        if target is None:
            unexpected.append(key)
            continue
        tensor = read()
        new = _assign(model, target, tensor, device, dtype, shells, mesh)
        loaded.add(target)
        if target.rpartition(".")[0] in shells:
            release_cached()
            release_freed_memory()
        for alias in aliases.get(target, ()):  # tied weights (an LM head sharing the embedding) stay tied
            if alias in loaded or alias not in expected:
                continue
            if new is not None and not _is_shell_weight(alias, shells):
                _set_tensor(model, alias, new)
            else:  # one side of the tie is quantized: each side gets its own copy of the same values
                _assign(model, alias, tensor, device, dtype, shells, mesh)
            loaded.add(alias)

    # Non-persistent buffers (rotary inv_freq, position_ids) are in no checkpoint: recompute those on meta.
    try:
        restore_non_persistent_buffers(model, [n for n in expected if n not in loaded], device)
    except MetaBufferError:
        if strict:
            raise
    missing = [n for n in expected if n not in loaded and _is_unset(model, n)]
    if strict and (missing or unexpected):
        raise KeyError(
            "Loaded weights do not match the model: "
            f"missing {describe_names(missing)}; unexpected {describe_names(unexpected)}. "
            "Pass strict=False to skip them, or key_map= to rename source keys."
        )
    for shell in shells.values():
        if not is_quantized(shell) and shell.weight.device.type != "meta":
            quantize_layer(shell, device)
    if compute_dtype is not None:
        set_compute_dtype(model, compute_dtype)
    return list(shells)


def _shell(layer: nn.Linear, config: QuantizationConfig, compute_dtype: torch.dtype | None) -> nn.Module:
    """A 4-bit layer waiting for its weight; its full-precision tensor is never materialised here."""
    if layer.weight.device.type != "meta":
        layer = layer.to("meta")  # drop the uninitialised storage of empty_init models now
    return to_linear4bit(layer, config, compute_dtype)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {
        name: [n for n in names if n != name] for names in groups.values() if len(names) > 1 for name in names
    }


def _resolve(name: str, expected: Mapping[str, torch.Tensor]) -> str | None:
    """Map a source key to the model's, looking through adapter wrappers.

    `x.weight` may live at `x.base_layer.weight`; None for a key the model does not have.
    """
    if name in expected:
        return name
    module, _, leaf = name.rpartition(".")
    wrapped = f"{module}.{BASE_LAYER}.{leaf}" if module else f"{BASE_LAYER}.{leaf}"
    return wrapped if wrapped in expected else None


def _iter_source(source: StateSource) -> Iterable[tuple[str, Callable[[], torch.Tensor]]]:
    if isinstance(source, Mapping):
        for key, tensor in source.items():
            yield key, functools.partial(_identity, tensor)
        return
    from safetensors import safe_open

    for path in _safetensors_files(source):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
        for key in keys:
            yield key, functools.partial(_read_one, path, key)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _read_one(path: Path, key: str) -> torch.Tensor:
    """Read one tensor and unmap the file again: a handle kept open would leave every page it has read
    resident, so the whole file would end up counted in the process's memory."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return handle.get_tensor(key)


def _safetensors_files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"No *.safetensors file in {path}.")
            files.extend(found)
        elif path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(
                    f"{path} is not a .safetensors file; only safetensors are read (never pickle)."
                )
            files.append(path)
        else:
            raise FileNotFoundError(f"No such weights file or folder: {path}")
    return files


def _assign(
    model: nn.Module,
    name: str,
    tensor: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    shells: Mapping[str, nn.Module],
    mesh: Any = None,
) -> torch.Tensor | None:
    """Put one tensor in place; return it if it is a parameter others may be tied to.

    With a `mesh`, a parameter keeps only this process's rows (a 4-bit weight: of its packed bytes, once
    the whole weight is quantized; its quant state stays whole on the module, as FSDP2 leaves it)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    shell_name = module_name
    if module_name in shells and leaf == "weight":
        if tuple(tensor.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit layer {shell_name!r}.")
        set_full_precision_weight(module, tensor.to(device))
        quantize_layer(module, device)
        if mesh is not None:
            packed = cast(torch.Tensor, module.weight)
            module._parameters["weight"] = keep_rows(packed, mesh)  # the whole packed bytes go
        return None
    old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
    if old is not None and old.device.type != "meta" and tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(old.shape)}."
        )
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.to(device)
    if leaf in module._parameters:
        requires_grad = old.requires_grad if old is not None else False
        frozen = module_name in shells  # the bias of a quantized layer is frozen like its weight
        trained = requires_grad and not frozen
        if mesh is not None:
            param = keep_rows(tensor, mesh, requires_grad=trained)
        else:
            param = nn.Parameter(tensor, requires_grad=trained)
        module._parameters[leaf] = param
        return param
    module._buffers[leaf] = tensor
    return None


def _untied(
    targets: Iterable[tuple[str, nn.Linear]], aliases: Mapping[str, list[str]]
) -> list[tuple[str, nn.Linear]]:
    """Leave out linear layers whose weight is tied to another parameter (a head sharing the embedding).

    The shared tensor stays in full precision for its other user anyway, so a 4-bit copy would add memory
    and break the tie (`tie_weights()` would then put a full-precision weight into a 4-bit layer).
    """
    kept: list[tuple[str, nn.Linear]] = []
    tied: list[tuple[str, nn.Linear]] = []
    for path, layer in targets:
        (tied if f"{path}.weight" in aliases else kept).append((path, layer))
    if tied:
        names = ", ".join(f"{path!r} (shares {aliases[f'{path}.weight'][0]!r})" for path, _ in tied)
        rank_zero_info(f"load_quantized: kept the tied linear layer(s) {names} in full precision.")
    return kept


def _is_shell_weight(name: str, shells: Mapping[str, nn.Module]) -> bool:
    module_name, _, leaf = name.rpartition(".")
    return module_name in shells and leaf == "weight"


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = tensor  # type: ignore[assignment]
    else:
        module._buffers[leaf] = tensor


def _is_unset(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    tensor = getattr(module, leaf)
    return tensor is None or tensor.device.type == "meta"
