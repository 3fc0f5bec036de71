"""Typed schemas of the training config, registered with Hydra's ConfigStore.

`conf/train.yaml` starts from `base_train_config`, so Hydra checks every override against these
dataclasses while composing: `lora.r=abc` (wrong type) or `lora.rr=8` (unknown key) fails with a message
naming the key, before a model is built. Nodes that carry arbitrary constructor arguments (`model`,
`data`, `logger`, `callbacks`, `trainer.strategy`) stay untyped dicts; Hydra's struct mode still rejects
a misspelled key there (add a new one with `+key=value`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

BASE_CONFIG_NAME = "base_train_config"


@dataclass
class PrecisionConf:
    """`lightning_qlora.QLoRAPrecision`: how the frozen base is stored (paper: NF4, blocksize 64, DQ)."""

    _target_: str = "lightning_qlora.QLoRAPrecision"
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    log_report: bool = True


@dataclass
class LoRAConf:
    """`lightning_qlora.LoRA` callback: adapter rank and placement (paper: r=64, alpha=16, dropout 0.1)."""

    _target_: str = "lightning_qlora.LoRA"
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] | None = None
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    adapter_dtype: str = "float32"
    export_dir: str | None = "${paths.output_dir}/adapter"
    export_module: str | None = None
    adapter_only_checkpoints: bool = True


@dataclass
class OptimizerConf:
    """`lightning_qlora.strategies.OptimizerConfig`, handed to the strategy (paper: paged AdamW, 2e-4)."""

    _target_: str = "lightning_qlora.strategies.OptimizerConfig"
    _convert_: str = "all"  # plain lists and dicts, not OmegaConf containers, reach the dataclass
    name: str = "paged_adamw"
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    scheduler: str = "constant"
    warmup_steps: int | None = None  # exclusive with warmup_ratio
    warmup_ratio: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


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
