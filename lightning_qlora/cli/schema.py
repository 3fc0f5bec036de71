"""Typed schemas of the training config, registered with Hydra's ConfigStore.

`conf/train.yaml` starts from `base_train_config`, so Hydra checks every override against these
dataclasses while composing: `lora.r=abc` (wrong type) or `lora.rr=8` (unknown key) fails with a message
naming the key, before a model is built. The `precision`, `lora` and `optimizer` schemas restate nothing:
their keys, types and defaults are read off `QuantizationConfig`, `LoRAConfig` and `OptimizerConfig` and
the constructors' own arguments (`PrecisionPluginSettings`, `LoRACallbackSettings`) by `settings_schema`,
so a new setting is one new dataclass field. Only those light modules are imported: `--help` and
`--cfg job` need neither torch nor Lightning. Nodes that carry arbitrary constructor arguments (`model`,
`data`, `logger`, `callbacks`, `trainer.strategy`) stay untyped dicts; Hydra's struct mode still rejects a
misspelled key there (add one with `+key=value`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lightning_qlora.lora.config import LoRACallbackSettings, LoRAConfig
from lightning_qlora.optimizer_config import OptimizerConfig
from lightning_qlora.quantization.config import PrecisionPluginSettings, QuantizationConfig

BASE_CONFIG_NAME = "base_train_config"

T = TypeVar("T")
_PRIMITIVES: tuple[type, ...] = (bool, int, float, str)


def settings_schema(config_cls: type, own_settings: type | None = None) -> Callable[[type[T]], type[T]]:
    """Complete a schema dataclass with the fields of `config_cls` and then those of `own_settings`.

    `own_settings` holds the constructor's arguments that are not fields of `config_cls` (`log_report`).
    Keys, defaults and help texts are read off the settings dataclasses,
    with their types turned into ones OmegaConf can check (tuples become lists, mappings dicts, a
    `str | torch.dtype` a str). Fields written in the decorated class come first (`_target_`) or replace
    a derived default (`export_dir` for the command).
    """

    def complete(schema: type[T]) -> type[T]:
        given = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
        given_types = typing.get_type_hints(schema)
        derived = _settings(config_cls)
        if own_settings is not None:
            derived += _settings(own_settings)
        entries: list[tuple[str, Any, Any]] = [
            (f.name, given_types[f.name], f) for f in given.values() if f.name.startswith("_")
        ]
        for name, annotation, default, metadata in derived:
            if name in given:
                entries.append((name, given_types[name], given[name]))
            else:
                entries.append(
                    (
                        name,
                        _schema_type(annotation, f"{config_cls.__name__}.{name}"),
                        _schema_field(default, metadata),
                    )
                )
        made = dataclasses.make_dataclass(
            schema.__name__, entries, namespace={"__doc__": schema.__doc__, "__module__": schema.__module__}
        )
        made.__qualname__ = schema.__qualname__
        return made

    return complete


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"Settings field {f.name!r} has no default; every setting needs one for the schema.")


class _TorchNames:
    """Stands in for `torch` when reading annotations such as `str | torch.dtype` without importing torch:
    a dtype cannot be written in a Hydra config, so the schema keeps the other member of the union."""

    class dtype:  # noqa: N801 (the name read off the annotation)
        pass


def _settings(settings_cls: type) -> list[tuple[str, Any, Any, Mapping[str, Any]]]:
    """(name, annotation, default, metadata) of each field of a settings dataclass."""
    hints = typing.get_type_hints(settings_cls, localns={"torch": _TorchNames})
    return [(f.name, hints[f.name], _default_of(f), f.metadata) for f in dataclasses.fields(settings_cls)]


def _schema_field(default: Any, metadata: Mapping[str, Any]) -> Any:
    value = _schema_value(default)
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(value), metadata=metadata)
    return field(default=value, metadata=metadata)


def _schema_value(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_schema_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _schema_value(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _schema_type(annotation: Any, where: str) -> Any:
    """The OmegaConf type for a settings annotation; a type it cannot check is an error naming the field."""
    if annotation is Any or annotation in _PRIMITIVES:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        usable = [a for a in args if a is not type(None) and _representable(a)]
        if not usable:
            raise TypeError(f"{where}: no member of {annotation} can be written in a Hydra config.")
        inner = _schema_type(usable[0], where)
        return typing.Optional[inner] if optional else inner  # noqa: UP045 (a runtime type object)
    if origin is tuple:
        items = {a for a in args if a is not Ellipsis}
        if len(items) == 1:
            return list[_schema_type(items.pop(), where)]  # type: ignore[misc]
    if origin in (dict, Mapping) or (
        origin is not None and isinstance(origin, type) and issubclass(origin, Mapping)
    ):
        key, value = args
        return dict[_schema_type(key, where), _schema_type(value, where)]  # type: ignore[misc]
    if annotation is Path or annotation is os.PathLike or origin is os.PathLike:
        return str
    raise TypeError(f"{where}: a setting of type {annotation} cannot be written in a Hydra config.")


def _representable(annotation: Any) -> bool:
    try:
        _schema_type(annotation, "")
    except TypeError:
        return False
    return True


@settings_schema(QuantizationConfig, PrecisionPluginSettings)
@dataclass
class PrecisionConf:
    """`lightning_qlora.QLoRAPrecision`: how the frozen base is stored (paper: NF4, blocksize 64, DQ).

    The keys and defaults are those of `QuantizationConfig` and the plugin's own arguments.
    """

    _target_: str = "lightning_qlora.QLoRAPrecision"


@settings_schema(LoRAConfig, LoRACallbackSettings)
@dataclass
class LoRAConf:
    """`lightning_qlora.LoRA` callback: adapter rank and placement (paper: r=64, alpha=16, dropout 0.1).

    The keys and defaults are those of `LoRAConfig` and the callback's own arguments, but for `export_dir`:
    the command writes the adapters into the run's folder.
    """

    _target_: str = "lightning_qlora.LoRA"
    export_dir: str | None = "${paths.output_dir}/adapter"


@settings_schema(OptimizerConfig)
@dataclass
class OptimizerConf:
    """`lightning_qlora.strategies.OptimizerConfig`, handed to the strategy (paper: paged AdamW, 2e-4)."""

    _target_: str = "lightning_qlora.strategies.OptimizerConfig"
    _convert_: str = "all"  # plain lists and dicts, not OmegaConf containers, reach the dataclass


@dataclass
class TrainerConf:
    """The `lightning.pytorch.Trainer` arguments people set most; add others with `+trainer.key=value`."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str | None = None  # leave None with a QLoRAPrecision plugin: Lightning refuses both
    max_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: str | None = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None  # the QLoRA strategies clip themselves (max_grad_norm)
    deterministic: Any = None
    benchmark: bool | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    default_root_dir: str | None = "${paths.output_dir}"
    fast_dev_run: Any = False
    use_distributed_sampler: bool = True
    # no_grad instead of inference_mode in evaluation: the job validates before fit, and metric states
    # created under inference_mode cannot be updated in place by fit's own validation afterwards
    inference_mode: bool = False
    profiler: Any = None


@dataclass
class MetricConf:
    """The validation metric compared before and after tuning, and returned to Hydra sweepers."""

    name: str = "val/acc"
    mode: str = "max"  # "max" or "min": which direction is better


@dataclass
class PathsConf:
    """Where a run writes: every output path in the configs derives from `output_dir`."""

    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    """The whole job. `precision: null` trains plain LoRA on an unquantized base."""

    seed: int = 42
    task_name: str = "train"
    paths: PathsConf = field(default_factory=PathsConf)
    precision: PrecisionConf | None = None  # a `precision/` option fills it in (typed); `none` leaves it
    lora: LoRAConf = field(default_factory=LoRAConf)
    optimizer: OptimizerConf = field(default_factory=OptimizerConf)
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: Any = None
    callbacks: dict[str, Any] = field(default_factory=dict)
    metric: MetricConf = field(default_factory=MetricConf)
    validate_before: bool = True  # the untuned metric, to compare with
    validate_after: bool = True  # skipped when fit's last validation already ran at its last step
    ckpt_path: str | None = None  # resume fit from this Lightning checkpoint
    plot_curves: bool = True  # curves.png (losses, metric, memory over steps) in the run folder


def register_configs() -> None:
    """Store the schema under `base_train_config` (idempotent: ConfigStore replaces same-name entries)."""
    ConfigStore.instance().store(name=BASE_CONFIG_NAME, node=TrainConfig)
