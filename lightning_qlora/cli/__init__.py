"""Hydra configuration of the training command: schemas, resolvers and where `conf/` lives.

`conf_dir()` returns the config folder ready to compose (the schema and the resolvers registered). The
schema names are imported on first use (PEP 562), so `lightning-qlora-train --version` loads nothing else.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_qlora.cli import paths
from lightning_qlora.cli.resolvers import register_resolvers, wandb_offline

if TYPE_CHECKING:
    from lightning_qlora.cli.schema import (
        BASE_CONFIG_NAME,
        LoRAConf,
        MetricConf,
        OptimizerConf,
        PathsConf,
        PrecisionConf,
        TrainConfig,
        TrainerConf,
        register_configs,
    )

_SCHEMA_NAMES = (
    "BASE_CONFIG_NAME",
    "LoRAConf",
    "MetricConf",
    "OptimizerConf",
    "PathsConf",
    "PrecisionConf",
    "TrainConfig",
    "TrainerConf",
    "register_configs",
)


def conf_dir() -> Path:
    """`conf/`, with the typed schema stored in Hydra's ConfigStore and the resolvers registered."""
    register_resolvers()
    importlib.import_module("lightning_qlora.cli.schema").register_configs()
    return paths.conf_dir()


def __getattr__(name: str) -> Any:
    if name in _SCHEMA_NAMES:
        return getattr(importlib.import_module("lightning_qlora.cli.schema"), name)
    raise AttributeError(f"module 'lightning_qlora.cli' has no attribute {name!r}")


register_resolvers()

__all__ = [
    "BASE_CONFIG_NAME",
    "LoRAConf",
    "MetricConf",
    "OptimizerConf",
    "PathsConf",
    "PrecisionConf",
    "TrainConfig",
    "TrainerConf",
    "conf_dir",
    "paths",
    "register_configs",
    "register_resolvers",
    "wandb_offline",
]
