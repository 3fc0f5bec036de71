"""QLoRAPrecision inside a real Lightning Trainer on CPU."""

from __future__ import annotations

import logging
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import TinyClassifier, TinyNet, toy_loader
from torch import nn

from lightning_qlora import QLoRAPrecision
from lightning_qlora.quantization import NoLinearLayersError, is_linear4bit, is_quantized
from lightning_qlora.quantization.compute_dtype import cpu_has_native_bf16, resolve_compute_dtype


def fit(module: pl.LightningModule, plugin: QLoRAPrecision, steps: int = 6) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, toy_loader())
    return trainer


def test_fit_quantizes_every_linear_but_the_head_and_trains() -> None:
    torch.manual_seed(0)
    module = TinyClassifier(lr=5e-2)
    plugin = QLoRAPrecision(compute_dtype="float32")
    fit(module, plugin, steps=12)
    layers = dict(module.model.named_modules())
    assert is_quantized(layers["net.0"]) and is_quantized(layers["net.2"])
    assert type(layers["lm_head"]) is nn.Linear  # excluded by default, like PEFT's "all-linear"
    # no full-precision copy of a quantized weight is left: the parameter holds packed uint8 codes
    assert layers["net.0"].weight.dtype == torch.uint8
    assert plugin.report is not None and plugin.report.quantized_layers == 2
    assert module.losses[-1] < module.losses[0]


def test_report_is_logged_once_at_setup(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("lightning_qlora")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning_qlora"):
            fit(TinyClassifier(), QLoRAPrecision(compute_dtype="float32"), steps=2)
    finally:
        logger.removeHandler(caplog.handler)
    # the handler may see a record twice (directly and through the root logger): count records, not calls
    tables = list(
        {id(r): r for r in caplog.records if "bits per quantized parameter" in r.getMessage()}.values()
    )
    assert len(tables) == 1
    assert "quantized (4-bit)" in tables[0].getMessage()


@pytest.mark.parametrize(
    ("exclude", "expect_quantized"),
    [
        (("lm_head",), {"net.0", "net.2"}),
        (("net.0", "lm_head"), {"net.2"}),
        (("*.2",), {"net.0", "lm_head"}),
        ((), {"net.0", "net.2", "lm_head"}),
    ],
)
def test_exclusion_patterns(exclude: tuple[str, ...], expect_quantized: set[str]) -> None:
    model = TinyNet()
    QLoRAPrecision(exclude=exclude).convert_module(model)
    model.to("cpu")  # the strategy's move, which quantizes CPU-resident layers
    quantized = {name for name, m in model.named_modules() if is_linear4bit(m)}
    assert quantized == expect_quantized
    assert all(is_quantized(m) for m in model.modules() if is_linear4bit(m))


def test_model_built_in_configure_model_is_quantized() -> None:
    class Late(TinyClassifier):
        def __init__(self) -> None:
            pl.LightningModule.__init__(self)
            self.model: nn.Module | None = None  # type: ignore[assignment]
            self.lr = 1e-2
            self.losses = []

        def configure_model(self) -> None:
            if self.model is None:
                self.model = TinyNet()

    module = Late()
    fit(module, QLoRAPrecision(compute_dtype="float32"), steps=2)
    assert is_quantized(module.model.net[0])


def test_compute_dtype_auto_on_cpu_follows_native_bf16() -> None:
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_compute_dtype("auto", "cpu") == expected
    assert resolve_compute_dtype("float32", "cpu") == torch.float32
    assert resolve_compute_dtype(torch.float16, "cpu") == torch.float16


def test_explicit_compute_dtype_is_honoured_in_the_layers() -> None:
    module = TinyClassifier()
    fit(module, QLoRAPrecision(compute_dtype="float32"), steps=1)
    assert module.model.net[0].compute_dtype == torch.float32


def test_model_without_linear_layer_is_rejected_naming_its_class() -> None:
    class NoLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 1)

    with pytest.raises(NoLinearLayersError, match=r"NoLinear has no torch\.nn\.Linear"):
        QLoRAPrecision().convert_module(NoLinear())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant_type": "int4"}, r"Unknown quant_type 'int4'; allowed: nf4, fp4"),
        ({"blocksize": 100}, r"Unsupported blocksize 100; allowed: 32, 64"),
        ({"compute_dtype": "float8"}, r"Unknown compute_dtype 'float8'; allowed: auto"),
        ({"compute_dtype": torch.int8}, r"compute_dtype must be a floating dtype"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QLoRAPrecision(**kwargs)  # type: ignore[arg-type]


def test_compute_dtype_on_a_device_without_4bit_kernels_is_rejected() -> None:
    with pytest.raises(ValueError, match="run on cpu, cuda or xpu devices, not 'mps'"):
        resolve_compute_dtype("float16", "mps")


def test_missing_bitsandbytes_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from lightning_qlora import QLoRAPrecision\n"
        "try:\n    QLoRAPrecision()\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR" in result.stdout, result.stderr
    assert "pip install 'bitsandbytes>=0.48'" in result.stdout


@pytest.mark.cuda
def test_cpu_built_model_is_quantized_on_cuda_when_moved() -> None:
    model = TinyNet()
    plugin = QLoRAPrecision()
    plugin.convert_module(model)
    model.to("cuda")
    layer = model.net[0]
    assert is_quantized(layer)
    assert layer.weight.device.type == "cuda"
    assert layer.weight.quant_state.absmax.device.type == "cuda"


@pytest.mark.cuda
def test_fit_on_cuda_uses_bf16_or_fp16_compute() -> None:
    module = TinyClassifier()
    plugin = QLoRAPrecision()
    trainer = pl.Trainer(
        accelerator="cuda", devices=1, max_steps=3, plugins=[plugin], logger=False, enable_checkpointing=False
    )
    trainer.fit(module, toy_loader())
    assert plugin.compute_dtype in (torch.bfloat16, torch.float16)
    assert module.model.net[0].weight.device.type == "cuda"
