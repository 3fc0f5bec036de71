"""`trainer.init_module()` (and Fabric's `init_module()`) with QLoRAPrecision build the model in 4 bits.

The peak-memory figure is measured in `benchmarks/init_module_memory.py`; here: the layers are 4-bit as
soon as the model exists, hold the bytes that quantizing the same (seeded) weights after construction
gives, train, and what cannot work at init time is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from tiny_models import TinyNet, tiny_llama, toy_loader
from torch import nn

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora._names import logical_name
from lightning_qlora.quantization import (
    QuantizationConfig,
    is_linear4bit,
    is_quantized,
    replace_linear_layers,
)
from lightning_qlora.quantization.layers import quantized_weight_state

DOWN_0 = "layers.0.mlp.down_proj"  # a dotted exclude pattern: decided at setup, not while building


class TinyLlamaLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()  # seeded inside
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _trainer(
    plugin: QLoRAPrecision, steps: int = 3, callbacks: list[pl.Callback] | None = None
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[plugin],
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _four_bit(model: nn.Module) -> dict[str, nn.Module]:
    return {logical_name(name): m for name, m in model.named_modules() if is_linear4bit(m)}


def test_a_tiny_llama_built_under_init_module_is_4bit_at_once_with_the_same_bytes_and_trains() -> None:
    plugin = QLoRAPrecision(compute_dtype="float32", exclude=("lm_head", DOWN_0), log_report=False)
    trainer = _trainer(plugin, steps=3, callbacks=[LoRA(r=4, alpha=8, dropout=0.0)])
    with trainer.init_module():
        module = TinyLlamaLM()
    built = _four_bit(module.model)
    assert len(built) == 12  # 2 x 7 projections; both down_proj wait for setup (DOWN_0 might name them)
    assert all(is_quantized(layer) for layer in built.values())
    assert (
        type(module.model.lm_head) is nn.Linear
        and type(module.model.model.layers[1].mlp.down_proj) is nn.Linear
    )
    assert plugin.compute_dtype == torch.float32

    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_ids()), batch_size=4))
    trained = _four_bit(module.model)
    assert sorted(trained) == sorted([*built, "model.layers.1.mlp.down_proj"])  # quantized at setup
    assert type(module.model.model.layers[0].mlp.down_proj.base_layer) is nn.Linear  # kept by DOWN_0
    assert all(torch.isfinite(torch.tensor(module.losses)))

    reference = tiny_llama()  # the same seed, built in full precision, then quantized
    replace_linear_layers(reference, QuantizationConfig(exclude=("lm_head", DOWN_0)), torch.float32)
    for name, layer in trained.items():
        ours, theirs = quantized_weight_state(layer), quantized_weight_state(reference.get_submodule(name))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    torch.testing.assert_close(module.model.lm_head.weight, reference.lm_head.weight, rtol=0, atol=0)


def _ids() -> torch.Tensor:
    return torch.randint(1, 128, (8, 12), generator=torch.Generator().manual_seed(1))


REPLAYED = {
    "nn.init.normal_": lambda w: nn.init.normal_(w, std=0.02),
    "weight.data.normal_": lambda w: w.data.normal_(0.0, 0.02),
    "nn.init.zeros_": nn.init.zeros_,
    "nn.init.kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w, a=1.0),
}


@pytest.mark.parametrize("initialise", list(REPLAYED.values()), ids=list(REPLAYED))
def test_initialising_again_after_construction_is_replayed_on_full_precision(
    initialise: Callable[[torch.Tensor], object],
) -> None:
    def build() -> nn.Module:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
        initialise(model[1].weight)
        return model

    with _trainer(QLoRAPrecision(compute_dtype="float32")).init_module():
        ours = build()
    reference = build()
    replace_linear_layers(reference, QuantizationConfig(), torch.float32)
    for index in (0, 1):
        mine, theirs = quantized_weight_state(ours[index]), quantized_weight_state(reference[index])
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


@pytest.mark.parametrize("initialise", [nn.init.trunc_normal_, nn.init.xavier_uniform_])
def test_an_initialiser_that_cannot_be_replayed_is_refused(initialise: Callable[..., object]) -> None:
    with _trainer(QLoRAPrecision(compute_dtype="float32")).init_module():
        model = nn.Sequential(nn.Linear(64, 64))
        with pytest.raises(RuntimeError, match=r"on a weight that QLoRAPrecision's init_module has already"):
            initialise(model[0].weight)


def test_fabric_init_module_builds_in_4bit() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[QLoRAPrecision(compute_dtype="float32")])
    with fabric.init_module():
        model = tiny_llama()
    assert len(_four_bit(model)) == 14
    assert type(model.lm_head) is nn.Linear


class BuiltInConfigureModel(pl.LightningModule):
    """Builds its model in `configure_model`, where Lightning enters the precision's init contexts too."""

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None
        self.four_bit_when_built: bool | None = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = TinyNet()
            self.four_bit_when_built = is_linear4bit(self.model.net[0])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        assert self.model is not None
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_a_model_built_in_configure_model_is_still_quantized_at_setup() -> None:
    """LoftQ and keep_sensitive need the full-precision weights there, as before."""
    module = BuiltInConfigureModel()
    _trainer(QLoRAPrecision(compute_dtype="float32", log_report=False), steps=1, callbacks=[LoRA(r=2)]).fit(
        module, toy_loader(n=8, batch_size=4)
    )
    assert module.four_bit_when_built is False
    assert module.model is not None and is_quantized(module.model.net[0].base_layer)


def test_keep_sensitive_is_refused_at_init_module_before_anything_is_built() -> None:
    trainer = _trainer(QLoRAPrecision(keep_sensitive=0.05))
    with (
        pytest.raises(ValueError, match=r"keep_sensitive=0\.05.*cannot be built in 4 bits under init_module"),
        trainer.init_module(),
    ):
        pytest.fail("the context must refuse before the model is built")


def test_the_compute_dtype_is_reported() -> None:
    assert QLoRAPrecision(compute_dtype="bfloat16").compute_dtype == torch.bfloat16
    plugin = QLoRAPrecision()  # "auto": known once the device is
    assert plugin.compute_dtype is None
    with _trainer(plugin).init_module():
        nn.Sequential(nn.Linear(64, 64))
    from lightning_qlora.quantization.compute_dtype import resolve_compute_dtype

    assert plugin.compute_dtype == resolve_compute_dtype("auto", "cpu")
