"""The native CPU 4-bit linear operator: the same bits as the Python band loop it replaces, a correct
torch.library registration (schema, fake implementation, autograd), torch.compile without graph breaks,
clear errors for bad arguments, and a working fallback where no C++ compiler exists."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from lightning_qlora.quantization import QuantizationConfig
from lightning_qlora.quantization.backends import bitsandbytes as bnb_backend
from lightning_qlora.quantization.backends import linear4bit_op
from lightning_qlora.quantization.layers import quantize_layer, set_layer_compute_dtype, to_linear4bit
from lightning_qlora.quantization.workspace import release_workspace, workspace_bytes

ROOT = Path(__file__).resolve().parents[2]

needs_op = pytest.mark.skipif(
    bnb_backend.cpu_kernel() is None or not linear4bit_op.available(),
    reason="the native CPU 4-bit linear operator cannot be built here",
)


def four_bit(
    in_features: int, out_features: int, compute_dtype: torch.dtype, bias: bool = True, **config: object
) -> nn.Linear:
    torch.manual_seed(0)
    layer = to_linear4bit(nn.Linear(in_features, out_features, bias=bias), QuantizationConfig(**config), None)  # type: ignore[arg-type]
    quantize_layer(layer)
    set_layer_compute_dtype(layer, compute_dtype)
    return layer


def step(layer: nn.Linear, x: torch.Tensor, trainable_bias: bool) -> tuple[torch.Tensor, ...]:
    """Forward, backward with a fixed gradient; returns the output and the gradients of x and the bias."""
    x = x.detach().clone().requires_grad_()
    if layer.bias is not None:
        layer.bias.requires_grad_(trainable_bias)
        layer.bias.grad = None
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    bias_grad = layer.bias.grad if layer.bias is not None and trainable_bias else None
    assert x.grad is not None
    return out.detach(), x.grad, *(() if bias_grad is None else (bias_grad,))


@needs_op
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("band_bytes", [1, bnb_backend.TILE_BYTES_PER_THREAD])  # many bands, one band
@pytest.mark.parametrize(
    ("compute_dtype", "double_quant"),
    [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True), (torch.float16, True)],
)
def test_bit_identical_to_the_python_band_loop(
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
    band_bytes: int,
    compute_dtype: torch.dtype,
    double_quant: bool,
) -> None:
    monkeypatch.setattr(bnb_backend, "TILE_BYTES_PER_THREAD", band_bytes)
    layer = four_bit(192, 300, compute_dtype, double_quant=double_quant)
    tiles = bnb_backend.BACKEND.weight_tiles(layer, compute_dtype)
    assert tiles is not None and tiles.packed is not None
    x = torch.randn(2, 7, 192, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            native = step(layer, x, trainable_bias=True)
        no_grad = layer(x).detach()
        monkeypatch.setattr(linear4bit_op, "available", lambda: False)
        python = step(layer, x, trainable_bias=True)
    finally:
        torch.set_num_threads(before)
    assert len(native) == len(python) == 3
    for got, expected in zip(native, python, strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(no_grad, python[0])


@needs_op
def test_op_is_what_the_layer_runs_and_its_gradient_graph_is_the_ops() -> None:
    layer = four_bit(64, 48, torch.float32)
    out = layer(torch.randn(3, 64, requires_grad=True))
    assert "lightning_qlora_linear4bit" in type(out.grad_fn).__name__


def op_args(compute_dtype: torch.dtype, bias: bool, tile_rows: int) -> tuple[object, ...]:
    layer = four_bit(128, 300, compute_dtype, bias=bias)
    packed = bnb_backend._packed_weight(layer)
    x = torch.randn(2, 5, 128, dtype=compute_dtype, requires_grad=True)
    b = torch.randn(300, dtype=compute_dtype, requires_grad=True) if bias else None
    return (x, *packed.op_args(), 300, tile_rows, b)


@needs_op
@pytest.mark.parametrize("tile_rows", [128, 300])  # bands (128 x 128 values: a block of nested blocks), whole
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear4bit(bias: bool, tile_rows: int) -> None:
    torch.library.opcheck(
        torch.ops.lightning_qlora.linear4bit.default, op_args(torch.float32, bias, tile_rows)
    )


@needs_op
def test_opcheck_input_grad() -> None:
    _, *weight, out_features, tile_rows, _ = op_args(torch.float32, False, 128)
    grad = torch.randn(2, 5, out_features)  # type: ignore[call-overload]
    args = (grad, *weight, 128, tile_rows)
    torch.library.opcheck(torch.ops.lightning_qlora.linear4bit_input_grad.default, args)


@needs_op
def test_fake_implementation_gives_shapes_without_running() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = op_args(torch.bfloat16, True, 128)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.lightning_qlora.linear4bit(*args)
    assert out.shape == (2, 5, 300) and out.dtype == torch.bfloat16


@needs_op
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({0: torch.randn(2, 5, 100)}, "packed must hold 15000 bytes for a 300 x 100 weight"),
        ({0: torch.randn(2, 5, 128, dtype=torch.float64)}, "float32, bfloat16 or float16"),
        ({1: torch.zeros(10, dtype=torch.uint8)}, "packed must hold 19200 bytes"),
        ({2: torch.zeros(16, dtype=torch.float64)}, "code must be Float"),
        ({3: torch.zeros(600)}, "absmax must be Byte"),
        ({5: None}, "needs nested_code, nested_absmax and offset"),
        ({8: 63}, "blocksize must be a positive even integer"),
        ({10: 0}, "tile_rows must be positive"),
        ({10: 100}, "a band of rows must start a block"),
        ({11: torch.randn(299)}, "bias must be a Float vector of 300 values"),
    ],
)
def test_bad_arguments_are_refused_with_what_is_wrong(change: dict[int, object], message: str) -> None:
    args = list(op_args(torch.float32, True, 128))
    for index, value in change.items():
        args[index] = value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lightning_qlora.linear4bit(*args)


@needs_op
def test_native_band_buffer_is_reused_counted_and_released() -> None:
    release_workspace()
    assert workspace_bytes() == 0
    large, small = four_bit(64, 48, torch.float32), four_bit(32, 16, torch.float32)
    large(torch.randn(1, 64))
    small(torch.randn(1, 32))
    assert workspace_bytes() == 48 * 64 * 4  # one float32 buffer, grown to the larger layer
    four_bit(32, 16, torch.bfloat16)(torch.randn(1, 32))
    assert workspace_bytes() == 48 * 64 * 4 + 16 * 32 * 2
    release_workspace()
    assert workspace_bytes() == 0


@needs_op
def test_a_4bit_layer_compiles_with_fullgraph_and_matches_eager() -> None:
    torch._dynamo.reset()
    layer = four_bit(64, 96, torch.float32)
    x = torch.randn(2, 8, 64)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = step(layer, x, trainable_bias=True)
    got = step(compiled, x, trainable_bias=True)  # type: ignore[arg-type]
    for a, b in zip(got, eager, strict=True):
        assert torch.equal(a, b)


@needs_op
@pytest.mark.slow
def test_compiled_qlora_model_trains_like_eager() -> None:
    """What raised RecursionError before the operator: torch.compile of a quantized Llama with adapters."""
    from lightning_qlora.lora import LoRAConfig, inject_adapters
    from lightning_qlora.quantization import replace_linear_layers

    torch._dynamo.reset()
    model = tiny_llama().train()
    replace_linear_layers(model, QuantizationConfig(), torch.float32)
    inject_adapters(model, LoRAConfig(r=4, dropout=0.0))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]  # type: ignore[union-attr]

    eager_loss, eager_grads = loss_and_grads(model)
    # aot_eager: dynamo, the fake implementation and AOT autograd, without inductor's minutes of codegen
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for got, expected in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_without_a_cxx_compiler_the_python_band_loop_runs_after_one_warning(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import logging, torch
        from torch import nn
        from lightning_qlora.quantization import QuantizationConfig
        from lightning_qlora.quantization.backends import linear4bit_op
        from lightning_qlora.quantization.layers import quantize_layer, to_linear4bit
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        layer = to_linear4bit(nn.Linear(64, 48), QuantizationConfig(), torch.float32)
        quantize_layer(layer)
        x = torch.randn(3, 64, requires_grad=True)
        for _ in range(3):
            layer(x).sum().backward()
        assert not linear4bit_op.available()
        print("grad_fn", type(layer(x).grad_fn).__name__)
        """
    )
    env = {
        **os.environ,
        "LIGHTNING_QLORA_CXX": str(tmp_path / "no-such-compiler"),
        "XDG_CACHE_HOME": str(tmp_path),  # nothing cached: the build is attempted and fails
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "grad_fn _FrozenLinearBackward" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "4-bit linear operator unavailable" in warnings[0], done.stderr


def test_build_without_a_compiler_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_qlora._native_build import NativeBuildError

    for name in ("LIGHTNING_QLORA_CXX", "CXX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(NativeBuildError, match="no C\\+\\+ compiler found"):
        linear4bit_op.build()
