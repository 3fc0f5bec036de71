"""Folding adapters into the base: a plain model (no LoRA, no 4-bit) to serve or share as one checkpoint."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_qlora._export_dir import check_export_dir, export_directory
from lightning_qlora._modules import set_submodule
from lightning_qlora._settings import SettingTypeError
from lightning_qlora.lora.adapter import AdapterModule, adapter_modules, is_adapter
from lightning_qlora.quantization.layers import KEEP_FULL_PRECISION_ATTR, dequantize_weight, is_linear4bit

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"


_MERGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_merge_dtype(dtype: object, owner: str) -> None:
    """A merged weight is `W + scale * B @ A` in floating point: an integer or 8-bit float dtype would
    round the update away (or wrap), so only the dtypes a model is served in are accepted."""
    if dtype is None or dtype in _MERGE_DTYPES:
        return dtype  # type: ignore[return-value]
    allowed = ", ".join(str(d) for d in _MERGE_DTYPES)
    raise SettingTypeError(
        f"{owner} dtype must be one of {allowed} or None (keep each weight's), got {dtype!r}."
    )


def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn an adapted (and possibly 4-bit) model into a plain one, IN PLACE, and return it.

    Every adapter (`LoRALinear` or any `AdapterModule`) becomes the `nn.Linear` of its merged weight and
    every remaining 4-bit layer a dequantized `nn.Linear`, so nothing of this package or bitsandbytes is
    needed to run the result. A 4-bit base is dequantized exactly as the 4-bit forward pass dequantizes it,
    so outputs match the adapted model's up to rounding. New layers are float32 (a 4-bit base) or their base
    weight's dtype, unless `dtype` is given, in which case the whole model is cast to it. The adapted model
    is gone afterwards: `copy.deepcopy` it first to keep it, or use `save_merged`, which leaves it
    untouched.
    """
    check_merge_dtype(dtype, "merge_adapters")
    if is_adapter(model):
        return _plain_linear(model, dtype)
    for name, module in list(model.named_modules()):
        if name and (is_adapter(module) or is_linear4bit(module)) and _attached(model, name, module):
            set_submodule(model, name, _plain_linear(module, dtype))
    for module in model.modules():
        if KEEP_FULL_PRECISION_ATTR in vars(module):
            delattr(module, KEEP_FULL_PRECISION_ATTR)
    if dtype is not None:
        model.to(dtype)
    return model


def _attached(model: nn.Module, name: str, module: nn.Module) -> bool:
    """False for a layer inside an adapter already replaced in this pass (its base layer, say)."""
    try:
        return model.get_submodule(name) is module
    except AttributeError:
        return False


def _plain_linear(module: nn.Module, dtype: torch.dtype | None, with_adapters: bool = True) -> nn.Linear:
    """An adapter (through the adapter protocol) or a 4-bit layer as the plain `nn.Linear` it computes
    (without `with_adapters`: an adapter's base layer alone, dequantized)."""
    if is_adapter(module):
        adapter = cast(AdapterModule, module)
        base = adapter.base_layer
        assert isinstance(base, nn.Linear)  # bitsandbytes' Linear4bit subclasses it
        if adapter.merged and not with_adapters:
            raise ValueError("An adapter is merged into its base weight: unmerge_in_place first.")
        weight = _float32_weight(base)
        if with_adapters and not adapter.merged:
            weight = weight + adapter.delta_weight().to(weight.device)
        default = torch.float32 if is_linear4bit(base) else base.weight.dtype
    else:
        assert isinstance(module, nn.Linear)
        base, weight, default = module, _float32_weight(module), torch.float32
    linear = nn.Linear(
        base.in_features,
        base.out_features,
        bias=base.bias is not None,
        device=weight.device,
        dtype=dtype or default,
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    linear.requires_grad_(False)
    linear.train(module.training)
    return linear


def _float32_weight(layer: nn.Linear) -> torch.Tensor:
    """A new float32 tensor of the layer's weight: dequantized if it is 4-bit, copied if not."""
    if is_linear4bit(layer):
        return dequantize_weight(layer, torch.float32)
    return layer.weight.detach().to(torch.float32, copy=True)


def merge_in_place(model: nn.Module) -> list[str]:
    """Fold every adapter into its full-precision base weight (undone by `unmerge_in_place`).

    The layers stay `LoRALinear` and skip the adapter path while merged: faster inference without
    giving up the adapters. Refuses (before changing anything) if any base is 4-bit.
    """
    layers = list(adapter_modules(model))
    four_bit = [name for name, layer in layers if is_linear4bit(layer.base_layer)]
    if four_bit:
        raise TypeError(
            f"Cannot merge in place into 4-bit base layers ({four_bit[:4]}): re-quantizing would lose the "
            "update. Use merge_adapters, which dequantizes the base and returns a plain model."
        )
    for _, layer in layers:
        layer.merge()
    return [name for name, _ in layers]


def unmerge_in_place(model: nn.Module) -> list[str]:
    """Take every merged adapter back out of its base weight (exact up to float rounding)."""
    layers = list(adapter_modules(model))
    for _, layer in layers:
        layer.unmerge()
    return [name for name, _ in layers]


def merged_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None, with_adapters: bool = True
) -> dict[str, torch.Tensor]:
    """The state dict `merge_adapters(model, dtype)` would have, computed without changing `model`.

    Keys are those of the plain model (no `base_layer`, no 4-bit statistics). Tensors tied in the
    model stay tied (the same tensor under both keys). Without `with_adapters` it is the base the
    adapters sit on (4-bit weights dequantized): what LoftQ's adapters need beside them.
    """
    check_merge_dtype(dtype, "merged_state_dict")
    state: dict[str, torch.Tensor] = {}
    replaced: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix) for prefix in replaced):
            continue
        prefix = f"{name}." if name else ""
        if is_adapter(module) or is_linear4bit(module):
            linear = _plain_linear(module, dtype, with_adapters)
            state[prefix + "weight"] = linear.weight.detach()
            if linear.bias is not None:
                state[prefix + "bias"] = linear.bias.detach()
            replaced.append(prefix)
            if not name:
                break
            continue
        for key, param in module.named_parameters(recurse=False):
            state[prefix + key] = param.detach()
        for key, buffer in module.named_buffers(recurse=False):
            if key not in module._non_persistent_buffers_set:
                state[prefix + key] = buffer.detach()
    if dtype is None:
        return state
    cast: dict[tuple[Any, ...], torch.Tensor] = {}
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            same = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tensor.shape,
                tensor.stride(),
            )
            if same not in cast:  # tied weights: cast once, so they stay one tensor
                cast[same] = tensor.to(dtype)
            state[key] = cast[same]
    return state


def save_merged(
    model: nn.Module,
    directory: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    with_adapters: bool = True,
) -> Path:
    """Write the merged plain model as safetensors, atomically; `model` itself is not changed.

    Without `with_adapters`, the base alone is written (4-bit weights dequantized, adapters left out).

    A transformers model is written with its own `save_pretrained` (config, generation config, shards,
    tied weights), so the folder loads with `AutoModel*.from_pretrained`. Any other module is written as
    `model.safetensors` (sharded with an index past `max_shard_size`), loadable with
    `model.load_state_dict(safetensors.torch.load_file(...))` into the unadapted architecture.

    `directory` must be new, empty or an earlier export of this package: it is replaced as a whole, so a
    folder holding anything else (the working directory, a run folder) is refused (`ExportDirError`).
    """
    check_merge_dtype(dtype, "save_merged")
    check_export_dir(directory, "save_merged directory")
    state = merged_state_dict(model, dtype, with_adapters)
    with export_directory(directory, "save_merged directory", "merged_model") as tmp:
        if callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config"):
            _save_pretrained(model, tmp, state, max_shard_size)
        else:
            save_state_dict(state, tmp, max_shard_size)
    return Path(directory)


def _save_pretrained(
    model: Any, folder: Path, state: dict[str, torch.Tensor], max_shard_size: int | str
) -> None:
    floating = Counter(t.dtype for t in state.values() if t.is_floating_point())
    model.save_pretrained(str(folder), state_dict=dict(state), max_shard_size=max_shard_size)
    # transformers records the dtype of the model object, which holds adapters and 4-bit weights; record
    # the dtype of the weights actually written, which `from_pretrained(dtype="auto")` reads.
    config_path = folder / "config.json"
    if config_path.is_file() and floating:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        dtype_name = str(floating.most_common(1)[0][0]).removeprefix("torch.")
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_state_dict(
    state: Mapping[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write `state` into `folder` as `model.safetensors`, or as shards plus an index past `max_shard_size`.

    safetensors refuses tensors that share memory, so tied tensors are written as separate copies.
    """
    from safetensors.torch import save_file

    tensors = _independent_cpu_tensors(state)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = folder / SAFETENSORS_NAME
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for index, shard in enumerate(shards, start=1):
        path = folder / f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, path.name))
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index_json, indent=2) + "\n", encoding="utf-8")
    return paths


def _independent_cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        value = tensor.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string such as "5GB" (decimal) or "4GiB" (binary), as in transformers."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"Cannot read a size from {size!r}; use bytes or a string such as '5GB' or '500MB'.")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").upper()])
