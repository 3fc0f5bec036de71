"""A task of your own with its own typed config: a LightningModule, a dataclass schema and Hydra.

The module below knows nothing about quantization or adapters: the config says how to fine-tune it, and
the package's three pieces do it. The schema is a dataclass that Hydra composes with the overrides given
on the command line, so every key is typed and checked (`lora.r=abc` or `lora.rr=8` is refused):

    python examples/custom_task.py                                   # the defaults below
    python examples/custom_task.py lora.r=16 precision.quant_type=fp4 trainer.max_steps=200
    python examples/custom_task.py precision.enabled=false           # plain 32-bit LoRA
    python examples/custom_task.py --print-config lora.r=16          # the composed config, then exit
    python examples/custom_task.py --smoke                           # 3 steps: check that it runs
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    inputs: int = 32
    width: int = 256
    depth: int = 3
    classes: int = 4


@dataclass
class PrecisionConfig:
    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class LoRASettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05


@dataclass
class TrainerConfig:
    max_steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    lora: LoRASettings = field(default_factory=LoRASettings)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    smoke: bool = False


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config changes, e.g. lora.r=16")
    parser.add_argument("--smoke", action="store_true", help="3 steps: check that it runs (smoke=true)")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    return parser.parse_args()


def load_config(overrides: list[str]) -> Config:
    """The dataclass defaults with the command line's overrides, composed and type-checked by Hydra."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="custom_task", node=Config)
    with initialize(version_base=None):
        try:
            cfg = compose("custom_task", overrides=overrides)
        except HydraException as error:  # a wrong key or value: say which, before anything is built
            cause = f" ({str(error.__cause__).splitlines()[0]})" if error.__cause__ else ""
            print(f"custom_task.py: error: {error}{cause}", file=sys.stderr)
            sys.exit(2)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


if __name__ == "__main__":
    ARGS = parse_args()  # before the imports below: --help answers without loading torch (seconds)
    CONFIG = load_config([*ARGS.overrides, *(["smoke=true"] if ARGS.smoke else [])])
    if ARGS.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(CONFIG)), end="")
        sys.exit(0)

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy


class Classifier(pl.LightningModule):
    """An MLP classifier: `depth` hidden linear layers (quantized, adapted) and a `head` (trained in full)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        sizes = [cfg.inputs] + [cfg.width] * cfg.depth
        layers = [(nn.Linear(a, b), nn.GELU()) for a, b in itertools.pairwise(sizes)]
        self.body = nn.Sequential(*(m for pair in layers for m in pair))
        self.head = nn.Linear(cfg.width, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss


def synthetic_data(cfg: ModelConfig, n: int = 1024) -> TensorDataset:
    """A learnable task: the class is the largest of `classes` fixed projections of the input."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.inputs, generator=generator)
    y = (x @ torch.randn(cfg.inputs, cfg.classes, generator=generator)).argmax(dim=1)
    return TensorDataset(x, y)


def main(cfg: Config) -> None:
    pl.seed_everything(cfg.seed)
    module = Classifier(cfg.model)
    plugins = []
    if cfg.precision.enabled:
        plugins.append(
            QLoRAPrecision(
                quant_type=cfg.precision.quant_type,
                double_quant=cfg.precision.double_quant,
                compute_dtype=torch.float32,
                exclude=["head"],
            )
        )
    lora = LoRA(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, modules_to_save=["head"])
    trainer = pl.Trainer(
        accelerator="cpu",
        plugins=plugins,
        callbacks=[lora],
        strategy=QLoRAStrategy(optimizer={"lr": cfg.trainer.lr}),
        max_steps=3 if cfg.smoke else cfg.trainer.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    data = synthetic_data(cfg.model)
    trainer.fit(module, DataLoader(data, batch_size=cfg.trainer.batch_size, shuffle=True))
    with torch.no_grad():
        x, y = data.tensors
        accuracy = float((module.eval()(x).argmax(-1) == y).float().mean())
    print(f"{trainer.global_step} steps, training accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main(CONFIG)
