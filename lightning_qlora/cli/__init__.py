"""Hydra configuration of the training command: schemas, resolvers and where `conf/` lives."""

from __future__ import annotations

from lightning_qlora.cli.paths import conf_dir
from lightning_qlora.cli.resolvers import register_resolvers, wandb_offline
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

register_configs()
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
    "register_configs",
    "register_resolvers",
    "wandb_offline",
]
