"""Adapters in PEFT's on-disk format, so `peft.PeftModel.from_pretrained` (and vLLM, TGI, ...) can use them.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, with module paths relative to the model
PEFT wraps and without the `base_layer` an adapter wrapper adds; `modules_to_save` modules are stored whole
as `base_model.model.<module path>.<parameter>`. Only safetensors are read: an `adapter_model.bin` is a
pickle, and unpickling a downloaded file can run arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_qlora._atomic import recover
from lightning_qlora._export_dir import check_export_dir, export_directory
from lightning_qlora._logging import rank_zero_info
from lightning_qlora._names import describe_names, logical_name
from lightning_qlora.lora.adapter import AdapterModule, adapter_modules, is_adapter
from lightning_qlora.lora.config import LoRAConfig
from lightning_qlora.lora.inject import inject_adapters
from lightning_qlora.lora.peft_checks import (
    InvalidAdapterError,
    check_adapter_tensors,
    check_scaling,
    parse_adapter_config,
)
from lightning_qlora.lora.peft_variants import (
    check_extra_tensors,
    folder_variant,
    load_extra_tensors,
    split_extra_tensors,
)
from lightning_qlora.lora.variants import variant_of
from lightning_qlora.quantization.layers import (
    KEEP_FULL_PRECISION_ATTR,
    dequantize_weight,
    is_linear4bit,
    is_quantized_weight,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class AdapterMismatchError(ValueError):
    """An adapter folder does not fit the model it is loaded into (names, shapes or ranks differ)."""


# --------------------------------------------------------------------------------------------- saving


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    config: LoRAConfig | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the adapters of `model` (and its `modules_to_save`) as a PEFT LoRA folder, atomically.

    `model` must be the module PEFT would wrap (the transformers model, not a LightningModule around it):
    keys are relative to it. Without `config`, rank, alpha, dropout and rsLoRA are read off the layers;
    layers whose rank or alpha differ from the most common one go into `rank_pattern` / `alpha_pattern`
    under their full path, which PEFT's suffix match resolves to exactly that layer.

    `directory` must be new, empty or an earlier export of this package: it is replaced as a whole, so a
    folder holding anything else (the working directory, a run folder) is refused (`ExportDirError`).
    """
    check_export_dir(directory, "save_peft_adapter directory")
    layers = [(logical_name(name), layer) for name, layer in adapter_modules(model)]
    saved_modules = _modules_to_save(model, config)
    if not layers and not saved_modules:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters and no modules_to_save to export.")
    adapter_config = _adapter_config(
        model,
        layers,
        saved_modules,
        config,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    dtype = config.dtype if config is not None else None
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        params = layer.adapter_params()
        for param_name, suffix in layer.peft_tensor_names().items():
            param = params[param_name]
            tensors[f"{KEY_PREFIX}{name}.{suffix}"] = param.detach().to(dtype or param.dtype)
    for name, module in saved_modules:
        for key, value in _full_precision_state(module).items():
            tensors[f"{KEY_PREFIX}{name}.{key}"] = value
    with export_directory(directory, "save_peft_adapter directory", "peft_adapter") as tmp:
        _write_weights(tmp / WEIGHTS_NAME, _independent_cpu_tensors(tensors))
        _write_config(tmp / CONFIG_NAME, adapter_config)
    return Path(directory)


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_config(path: Path, adapter_config: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _independent_cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory, which safetensors requires (tied weights get a copy)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in tensors.items():
        value = tensor.detach().to("cpu").contiguous()
        storage = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        if storage in seen:
            value = value.clone()
        seen.add((value.untyped_storage().data_ptr(), value.untyped_storage().nbytes()))
        out[key] = value
    return out


def _modules_to_save(model: nn.Module, config: LoRAConfig | None) -> list[tuple[str, nn.Module]]:
    """The outermost modules trained whole: flagged by injection, or named by `config.modules_to_save`."""
    from lightning_qlora._names import matches_any

    patterns = config.modules_to_save if config is not None else ()
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if getattr(module, KEEP_FULL_PRECISION_ATTR, False) or (patterns and matches_any(name, patterns)):
            found.append((name, module))
    return [(logical_name(name), module) for name, module in found]


def _full_precision_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as PEFT stores it: 4-bit layers inside it are written dequantized."""
    state = module.state_dict(keep_vars=False)
    for name, sub in module.named_modules():
        if not is_linear4bit(sub):
            continue
        key = f"{name}.weight" if name else "weight"
        for stat in [k for k in state if k.startswith(key + ".")]:
            del state[stat]
        state[key] = dequantize_weight(sub, torch.float32)
    return {logical_name(k): v for k, v in state.items()}


def _adapter_config(
    model: nn.Module,
    layers: list[tuple[str, AdapterModule]],
    saved_modules: list[tuple[str, nn.Module]],
    config: LoRAConfig | None,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    use_rslora = config.use_rslora if config is not None else _infer_rslora(layers)
    ranks = {name: layer.r for name, layer in layers}
    alphas = {name: _effective_alpha(layer, use_rslora) for name, layer in layers}
    r = config.r if config is not None else _most_common(ranks.values(), default=8)
    alpha = config.alpha if config is not None else _most_common(alphas.values(), default=float(r))
    if config is not None:
        dropout = float(config.dropout)
    else:
        dropout = _most_common((_dropout_p(layer) for _, layer in layers), default=0.0)
    leaf_names = sorted({name.rpartition(".")[2] for name, _ in layers})
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": _json_number(alpha),
        "lora_dropout": dropout,
        "target_modules": leaf_names or None,
        "exclude_modules": _not_adapted_namesakes(model, layers, leaf_names) or None,
        "rank_pattern": {name: rank for name, rank in ranks.items() if rank != r},
        "alpha_pattern": {
            name: _json_number(value) for name, value in alphas.items() if not math.isclose(value, alpha)
        },
        "use_rslora": bool(use_rslora),
        "modules_to_save": [name for name, _ in saved_modules] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,  # PEFT's default; a variant's own fields (DoRA's use_dora) follow
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    } | _variant_fields(layers)


def _not_adapted_namesakes(
    model: nn.Module, layers: list[tuple[str, AdapterModule]], leaf_names: list[str]
) -> list[str]:
    """Modules that share a leaf name with an adapted layer but are not adapted: PEFT must skip them.

    PEFT adapts every module whose name ends in a `target_modules` entry; listing these few in
    `exclude_modules` keeps `target_modules` short while PEFT adapts exactly the layers we did.
    """
    adapted = {name for name, _ in layers}
    inside_adapter = tuple(f"{name}." for name in adapted)
    leaves = set(leaf_names)
    others = []
    for name, _ in model.named_modules():
        plain = logical_name(name)
        if plain in adapted or plain.startswith(inside_adapter):
            continue
        if plain.rpartition(".")[2] in leaves:
            others.append(plain)
    return sorted(set(others))


def _infer_rslora(layers: list[tuple[str, AdapterModule]]) -> bool:
    """rsLoRA if every layer's scale is alpha / sqrt(r) (at r = 1 both rules agree: plain LoRA)."""
    rs = [math.isclose(layer.scaling, layer.alpha / math.sqrt(layer.r)) for _, layer in layers]
    plain = [math.isclose(layer.scaling, layer.alpha / layer.r) for _, layer in layers]
    return bool(layers) and all(rs) and not all(plain)


def _effective_alpha(layer: AdapterModule, use_rslora: bool) -> float:
    """The alpha that gives this layer's actual scale under PEFT's rule, which is what PEFT recomputes."""
    alpha = layer.scaling * (math.sqrt(layer.r) if use_rslora else layer.r)
    return float(layer.alpha) if math.isclose(alpha, layer.alpha, rel_tol=1e-6) else alpha


def _dropout_p(layer: AdapterModule) -> float:
    return float(layer.peft_config_fields().get("lora_dropout", 0.0))


def _variant_fields(layers: list[tuple[str, AdapterModule]]) -> dict[str, Any]:
    """What the adapters' class adds to the config (a variant's flag such as `use_dora`), one value each."""
    fields: dict[str, Any] = {}
    for name, layer in layers:
        for key, value in layer.peft_config_fields().items():
            if key == "lora_dropout":
                continue
            if key in fields and fields[key] != value:
                raise ValueError(f"Adapters disagree on {key!r} ({fields[key]!r} vs {value!r} at {name!r}).")
            fields[key] = value
    return fields


def _most_common(values: Iterable[Any], default: Any) -> Any:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else default


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _name_or_path(model: nn.Module) -> str | None:
    """What a transformers model was loaded from, so PEFT can find the base model again."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


# -------------------------------------------------------------------------------------------- loading


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> list[str]:
    """Load a PEFT LoRA folder into `model`; returns the module paths that received weights.

    If `model` has no adapters yet, they are injected first, on exactly the layers the file holds
    weights for, with rank and alpha from `adapter_config.json` (`rank_pattern` / `alpha_pattern`
    resolved as PEFT does). If it has adapters, their scale is set from the file. Everything is checked
    before anything is changed. With `strict=False`, adapters the file lacks and keys naming modules the
    model does not have are skipped; shape and rank mismatches always raise.
    """
    folder = Path(directory)
    peft_config = read_adapter_config(folder)
    weights = read_adapter_weights(folder)
    variant = folder_variant(peft_config, folder)
    weights, extras = split_extra_tensors(weights, KEY_PREFIX)
    lora, full = _split_keys(weights)
    check_adapter_tensors(peft_config, lora, full, folder)  # before anything else: nothing poisons the model
    check_extra_tensors(extras, lora, variant, folder)
    modules = _logical_modules(model)

    nonexistent = sorted(name for name in lora if name not in modules)
    nonexistent += sorted(key for key in full if _find_tensor(model, modules, key) is None)
    if nonexistent and strict:
        raise AdapterMismatchError(_nonexistent_message(model, modules, nonexistent, folder))
    lora = {name: pair for name, pair in lora.items() if name in modules}
    full = {key: value for key, value in full.items() if _find_tensor(model, modules, key) is not None}

    plan = _adapter_plan(peft_config, lora, folder)  # module -> (r, alpha)
    check_scaling(plan, lora, bool(peft_config.get("use_rslora", False)), folder)
    existing = {logical_name(name): layer for name, layer in adapter_modules(model)}
    if existing:
        _check_existing(existing, lora, strict, folder)
        other_kind = sorted(name for name in lora if variant_of(existing[name]) is not variant)
        if other_kind:
            theirs = sorted({variant_of(existing[name]).title for name in other_kind})
            raise AdapterMismatchError(
                f"{folder} holds {variant.title} adapters, but the model's adapters on "
                f"{describe_names(other_kind, 4)} are {' / '.join(theirs)}; load into a model without "
                "adapters to have the file's kind injected."
            )
    else:
        _check_injectable(modules, lora, plan, folder)
    _check_full_shapes(model, modules, full, folder)

    if not existing and lora:
        config = _lora_config_from(peft_config, plan, lora, variant.name)
        injected = set(inject_adapters(model, config))
        not_injected = sorted(set(lora) - {logical_name(n) for n in injected})
        if not_injected:
            raise AdapterMismatchError(
                f"{folder} has LoRA weights for {not_injected[:4]} but those layers could not be adapted "
                "(not nn.Linear layers, or inside a modules_to_save module)."
            )
        existing = {logical_name(name): layer for name, layer in adapter_modules(model)}
        # New modules start in training mode: follow the layer each wraps (in eval, no adapter dropout).
        for name in injected:
            new_layer = existing[logical_name(name)]
            cast(nn.Module, new_layer).train(new_layer.base_layer.training)

    use_rslora = bool(peft_config.get("use_rslora", False))
    loaded = []
    with torch.no_grad():
        for name, (lora_a, lora_b) in lora.items():
            layer = existing[name]
            params = layer.adapter_params()
            params["lora_A"].copy_(lora_a)
            params["lora_B"].copy_(lora_b)
            load_extra_tensors(cast(nn.Module, layer), variant, name, extras)
            r, alpha = plan[name]
            layer.alpha = alpha
            layer.scaling = alpha / (math.sqrt(r) if use_rslora else r)
            loaded.append(name)
        for key, value in full.items():
            target = _find_tensor(model, modules, key)
            assert target is not None
            target.copy_(value)
    full_modules = sorted({key.rpartition(".")[0] for key in full})
    rank_zero_info(f"LoRA: loaded {len(loaded)} adapter(s) and {len(full)} full tensor(s) from {folder}")
    return loaded + full_modules


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """`adapter_config.json` of a PEFT LoRA folder, checked for features this package does not implement."""
    folder = Path(directory)
    if not folder.exists():
        recover(folder)  # a writer killed between its two renames left the old folder aside: put it back
    if not folder.is_dir():
        raise FileNotFoundError(f"No adapter folder at {folder}.")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a PEFT adapter folder needs {CONFIG_NAME}.")
    config = parse_adapter_config(path)  # a JSON object, its fields typed, finite and in range
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{path} describes a {config.get('peft_type')} adapter; only LORA adapters load here."
        )
    unsupported = {
        "lora_bias": bool(config.get("lora_bias")),
        "target_parameters": bool(config.get("target_parameters")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise ValueError(f"{path} uses {used}, which lightning-qlora's LoRALinear does not implement.")
    return config


def read_adapter_weights(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_model.safetensors`; never unpickles `adapter_model.bin`."""
    from safetensors.torch import load_file

    folder = Path(directory)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors' errors do not name the file (truncated, empty, ...)
            raise InvalidAdapterError(
                f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it may be "
                "truncated or another format. Export the adapters again, or restore the file."
            ) from err
    if (folder / PICKLE_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{path} not found; {folder} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which "
            "lightning-qlora does not load (unpickling an untrusted file can run arbitrary code). Convert it "
            "to safetensors where you trust it, e.g. `PeftModel.from_pretrained(...).save_pretrained(dir)`."
        )
    raise FileNotFoundError(f"{path} not found: a PEFT adapter folder needs {WEIGHTS_NAME}.")


def _split_keys(
    weights: Mapping[str, torch.Tensor],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """LoRA pairs by module path, and whole tensors (modules_to_save) by parameter path."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    unsupported = []
    for key, value in weights.items():
        name = key.removeprefix(KEY_PREFIX)
        match = _LORA_KEY.match(name)
        if match:
            halves.setdefault(match["module"], {})[match["which"]] = value
        elif ".lora_" in name:
            unsupported.append(key)
        else:
            full[name] = value
    if unsupported:
        raise ValueError(
            f"Adapter tensors of a kind this package does not implement (embedding LoRA, an unregistered "
            f"variant, ...): {unsupported[:4]}."
        )
    incomplete = sorted(name for name, pair in halves.items() if len(pair) != 2)
    if incomplete:
        raise AdapterMismatchError(f"Adapter weights lack lora_A or lora_B for {incomplete[:4]}.")
    return {name: (pair["A"], pair["B"]) for name, pair in halves.items()}, full


def _logical_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by the name they had before adapters wrapped them (an adapter wins over its base layer)."""
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name:
            modules.setdefault(logical_name(name), module)
    return modules


def _find_tensor(model: nn.Module, modules: Mapping[str, nn.Module], key: str) -> torch.Tensor | None:
    """The parameter or buffer stored under `key` in the unadapted model, if the model has it."""
    module_name, _, attr = key.rpartition(".")
    module = modules.get(module_name) if module_name else model
    if is_adapter(module):
        module = cast(AdapterModule, module).base_layer
    if module is None:
        return None
    value = module._parameters.get(attr, module._buffers.get(attr))
    return value if isinstance(value, torch.Tensor) else None


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern that is a regex suffix of the module path wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _adapter_plan(
    peft_config: Mapping[str, Any], lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]], folder: Path
) -> dict[str, tuple[int, float]]:
    """(r, alpha) of every adapted module per the config, checked against the rank of the tensors."""
    r = int(peft_config.get("r", 8))
    alpha = float(peft_config.get("lora_alpha", 8))  # PEFT's default
    rank_pattern = peft_config.get("rank_pattern") or {}
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    plan: dict[str, tuple[int, float]] = {}
    wrong = []
    for name, (lora_a, lora_b) in lora.items():
        rank = int(_pattern_value(rank_pattern, name, r))
        plan[name] = (rank, float(_pattern_value(alpha_pattern, name, alpha)))
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            shapes = f"lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)}"
            wrong.append(f"{name!r}: config r={rank}, tensors {shapes} (rank {lora_a.shape[0]})")
    if wrong:
        raise AdapterMismatchError(
            f"Rank mismatch in {folder}: {CONFIG_NAME} (r, rank_pattern) gives another rank than the "
            f"tensors for {len(wrong)} layer(s): {'; '.join(wrong[:4])}."
        )
    return plan


def _check_injectable(
    modules: Mapping[str, nn.Module],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    plan: Mapping[str, tuple[int, float]],
    folder: Path,
) -> None:
    problems = []
    for name, (lora_a, lora_b) in lora.items():
        module = modules[name]
        if not isinstance(module, nn.Linear):
            problems.append(f"{name!r} is a {type(module).__name__}, not a linear layer")
            continue
        r = plan[name][0]
        want_a, want_b = (r, module.in_features), (module.out_features, r)
        if tuple(lora_a.shape) != want_a or tuple(lora_b.shape) != want_b:
            problems.append(
                f"{name!r}: file has lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)}, the layer "
                f"needs {want_a} / {want_b}"
            )
    _raise_shape_problems(problems, folder)


def _check_existing(
    existing: Mapping[str, AdapterModule],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    strict: bool,
    folder: Path,
) -> None:
    not_adapted = sorted(set(lora) - set(existing))
    if not_adapted:
        raise AdapterMismatchError(
            f"{folder} has LoRA weights for {describe_names(not_adapted, 4)}, which exist in the model but "
            f"have no adapter; adapted layers are {describe_names(sorted(existing), 4)}. Load into a model "
            "without adapters to have them injected as the file says."
        )
    missing = sorted(set(existing) - set(lora))
    if missing and strict:
        raise AdapterMismatchError(
            f"{folder} lacks weights for {len(missing)} adapted layer(s) of the model, e.g. "
            f"{describe_names(missing, 4)} (pass strict=False to load the rest)."
        )
    problems = []
    for name, (lora_a, lora_b) in lora.items():
        layer = existing[name]
        if layer.merged:
            problems.append(f"{name!r} is merged into its base weight; unmerge it first")
        params = layer.adapter_params()
        for which, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            param = params[which]
            if tensor.shape != param.shape:
                problems.append(
                    f"key {KEY_PREFIX}{name}.{which}.weight has shape {tuple(tensor.shape)}, the model's "
                    f"{which} has {tuple(param.shape)} (rank {layer.r})"
                )
    _raise_shape_problems(problems, folder)


def _check_full_shapes(
    model: nn.Module, modules: Mapping[str, nn.Module], full: Mapping[str, torch.Tensor], folder: Path
) -> None:
    problems = []
    for key, value in full.items():
        target = _find_tensor(model, modules, key)
        assert target is not None
        if is_quantized_weight(target):
            problems.append(f"{key!r} is a 4-bit weight in the model; keep that module in full precision")
        elif target.shape != value.shape:
            problems.append(
                f"key {key!r} has shape {tuple(value.shape)}, the model's has {tuple(target.shape)}"
            )
    _raise_shape_problems(problems, folder)


def _raise_shape_problems(problems: list[str], folder: Path) -> None:
    if problems:
        detail = "; ".join(problems[:4])
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise AdapterMismatchError(f"Shape mismatch between {folder} and the model: {detail}{more}.")


def _nonexistent_message(
    model: nn.Module, modules: Mapping[str, nn.Module], nonexistent: list[str], folder: Path
) -> str:
    hint = ""
    for child, _ in model.named_children():
        prefixed = [f"{child}.{name}" for name in nonexistent]
        if all(name in modules or _find_tensor(model, modules, name) is not None for name in prefixed):
            hint = f" They all exist under `{child}`: pass `model.{child}` (the module PEFT wrapped) instead."
            break
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear) or is_adapter(module)]
    return (
        f"{folder} has weights for {len(nonexistent)} module(s) or tensor(s) that {type(model).__name__} "
        f"does not have: {describe_names(nonexistent, 4)}. "
        f"Linear layers that exist: {describe_names(linear, 6)}.{hint}"
    )


def _lora_config_from(
    peft_config: Mapping[str, Any],
    plan: Mapping[str, tuple[int, float]],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    variant: str,
) -> LoRAConfig:
    """A LoRAConfig that adapts exactly the layers the file has weights for, with the file's r, alpha and
    variant."""
    r = int(peft_config.get("r", 8))
    alpha = float(peft_config.get("lora_alpha", 8))  # PEFT's default
    first = next(iter(lora.values()))[0]
    return LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=float(peft_config.get("lora_dropout", 0.0) or 0.0),
        target_modules=tuple(sorted(plan)),
        exclude=(),
        rank_pattern={name: rank for name, (rank, _) in plan.items() if rank != r},
        alpha_pattern={name: a for name, (_, a) in plan.items() if not math.isclose(a, alpha)},
        use_rslora=bool(peft_config.get("use_rslora", False)),
        variant=variant,
        modules_to_save=tuple(peft_config.get("modules_to_save") or ()),
        adapter_dtype=_DTYPE_NAMES.get(first.dtype, "float32"),
    )
