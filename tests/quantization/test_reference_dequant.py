"""Every CPU path of the package decodes 4-bit weights to what the format defines, for every row length.

The reference (tests/reference_dequant.py) is plain torch written from the format's definition: a flat
block layout over the row-major weight. bitsandbytes 0.50.2's own CPU decode is wrong on AVX-512 CPUs for
rows of a multiple of 16 values that end inside a block (docs/interop.md), so the package is held to the
reference, and the reference itself to the weight that was quantized.

Cheap paths (dequantize, forward, input gradient; native kernel and plain-torch fallback) run the full
matrix: row lengths 8 ... 1096 in steps of 8, 1, 3 and 32 rows, NF4 and FP4, double quantization on and
off, fp32 and bf16. The expensive ones (save_merged, LoftQ, load_quantized) run aligned rows and a spread
of rows that end inside a block.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
from reference_dequant import TABLES, block_scales, reference_weight
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_qlora import load_quantized, save_merged
from lightning_qlora.lora import LoRAConfig, adapter_modules, inject_adapters, loftq_init
from lightning_qlora.quantization import QuantizationConfig, replace_linear_layers
from lightning_qlora.quantization.backends import bitsandbytes as bnb_backend
from lightning_qlora.quantization.layers import (
    dequantize_weight,
    quantize_layer,
    quantized_weight_state,
    set_layer_compute_dtype,
    to_linear4bit,
)

ROW_LENGTHS = tuple(range(8, 1097, 8))
OUT_FEATURES = (1, 3, 32)
FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
FORMAT_IDS = [f"{q}-{'dq' if d else 'plain'}" for q, d in FORMATS]
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
# For the expensive paths: rows that start blocks, rows of a multiple of 16 that end inside one (what
# bitsandbytes' AVX-512 path gets wrong: 16, 48, 80, 688, 720) and rows of an odd multiple of 8.
SUBSET = ((3, 64), (32, 1024), (3, 16), (32, 48), (1, 80), (32, 688), (3, 720), (32, 24), (3, 1096))


def config(quant_type: str, double_quant: bool) -> QuantizationConfig:
    return QuantizationConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype="float32")


def weights(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight of standard deviation 0.05 and a bias, seeded by the shape."""
    g = torch.Generator().manual_seed(rows * 10_000 + cols)
    return torch.randn(rows, cols, generator=g) * 0.05, torch.randn(rows, generator=g) * 0.05


def four_bit(rows: int, cols: int, quant_type: str, double_quant: bool) -> nn.Linear:
    weight, bias = weights(rows, cols)
    linear = nn.Linear(cols, rows)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    layer = to_linear4bit(linear, config(quant_type, double_quant), torch.float32)
    quantize_layer(layer)
    return layer


@dataclass(frozen=True)
class Case:
    layer: nn.Linear
    original: torch.Tensor
    tensors: dict[str, torch.Tensor]  # the packed weight's state-dict form
    reference: torch.Tensor  # fp32


@functools.cache
def cases(quant_type: str, double_quant: bool) -> tuple[Case, ...]:
    """Every shape of the matrix in one format, with its reference weight; built once per format."""
    built = []
    for cols in ROW_LENGTHS:
        for rows in OUT_FEATURES:
            layer = four_bit(rows, cols, quant_type, double_quant)
            tensors = quantized_weight_state(layer)
            built.append(Case(layer, weights(rows, cols)[0], tensors, reference_weight(tensors)))
    return tuple(built)


def shape(layer: nn.Linear) -> str:
    return f"({layer.out_features}, {layer.in_features})"


@pytest.fixture(params=["kernel", "fallback"])
def dequant_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both CPU decodes: the native kernel (where it builds) and the plain-torch fallback without it."""
    if request.param == "fallback":
        monkeypatch.setattr(bnb_backend, "cpu_kernel", lambda: None)
    elif bnb_backend.cpu_kernel() is None:
        pytest.skip("the native CPU dequantization kernel is not available here")
    return str(request.param)


def within_quantization_error(
    original: torch.Tensor, tensors: dict[str, torch.Tensor], quant_type: str
) -> bool:
    """The reference decode is the weight that was quantized: each value within half the widest gap of the
    code table times its block's absmax, plus (double quantization) the error of the stored absmax."""
    n = original.numel()
    flat = F.pad(original.flatten(), (0, -n % 64)).view(-1, 64)
    absmax = flat.abs().amax(dim=1)
    levels = sorted(TABLES[quant_type])
    half_gap = max(b - a for a, b in itertools.pairwise(levels)) / 2
    bound = absmax * half_gap * (1 + 1e-5) + (absmax - block_scales(tensors)).abs() + 1e-7
    decoded = F.pad(reference_weight(tensors).flatten(), (0, -n % 64)).view(-1, 64)
    return bool(((decoded - flat).abs() <= bound[:, None]).all())


# ------------------------------------------------------------------------------------ the full matrix


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_reference_decodes_the_quantized_weight(quant_type: str, double_quant: bool) -> None:
    wrong = [
        shape(case.layer)
        for case in cases(quant_type, double_quant)
        if not within_quantization_error(case.original, case.tensors, quant_type)
    ]
    assert not wrong, f"the reference decode is not the quantized weight for {wrong}"


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_dequantize_equals_the_reference(dequant_path: str, quant_type: str, double_quant: bool) -> None:
    wrong = []
    for case in cases(quant_type, double_quant):
        for dtype in COMPUTE_DTYPES:
            got = dequantize_weight(case.layer, dtype)
            if got.dtype != dtype or not torch.equal(got, case.reference.to(dtype)):
                wrong.append(f"{shape(case.layer)} {dtype}")
    assert not wrong, f"dequantize_weight differs from the reference for {wrong}"


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_forward_and_input_gradient_equal_the_reference(
    dequant_path: str, quant_type: str, double_quant: bool
) -> None:
    """The same operations on the reference weight give the same bits: F.linear forward, grad @ W back."""
    g = torch.Generator().manual_seed(0)
    wrong = []
    for case in cases(quant_type, double_quant):
        layer, reference = case.layer, case.reference
        x = torch.randn(2, layer.in_features, generator=g)
        grad = torch.randn(2, layer.out_features, generator=g)
        for dtype in COMPUTE_DTYPES:
            set_layer_compute_dtype(layer, dtype)
            weight, bias = reference.to(dtype), layer.bias.to(dtype)
            x_in = x.clone().requires_grad_()
            out = layer(x_in)
            out.backward(grad)
            if not torch.equal(out, F.linear(x.to(dtype), weight, bias).float()):
                wrong.append(f"forward {shape(layer)} {dtype}")
            if not torch.equal(x_in.grad, (grad.to(dtype) @ weight).float()):
                wrong.append(f"input grad {shape(layer)} {dtype}")
        set_layer_compute_dtype(layer, torch.float32)
    assert not wrong, f"differs from the reference: {wrong}"


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_band_by_band_forward_and_input_gradient_equal_the_reference(
    double_quant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large layers are dequantized a band of rows at a time (the native kernel from a row offset): bands
    of a few rows here, over rows that end inside blocks (and, with double quantization, inside nested
    blocks of 64 x 256 values)."""
    if bnb_backend.cpu_kernel() is None:
        pytest.skip("bands need the native CPU dequantization kernel")
    monkeypatch.setattr(bnb_backend, "TILE_BYTES_PER_THREAD", 1 << 12)
    shapes = [(2100, 16), (1100, 80)] if double_quant else [(40, 688), (40, 80), (24, 1024), (30, 1096)]
    for rows, cols in shapes:
        layer = four_bit(rows, cols, "nf4", double_quant)
        tiles = bnb_backend.BACKEND.weight_tiles(layer, torch.float32)
        assert tiles is not None and tiles.rows < rows, (rows, cols)  # more than one band
        reference = reference_weight(quantized_weight_state(layer))
        x = torch.randn(2, cols, requires_grad=True)
        out = layer(x)
        grad = torch.randn_like(out)
        out.backward(grad)
        # A band's matmul may sum in another order than one over the whole weight (fp32 rounding, ~1e-6);
        # a wrong decode moves outputs by the weight's scale (~1e-2).
        torch.testing.assert_close(out, F.linear(x.detach(), reference, layer.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, grad @ reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the expensive paths


class Stack(nn.Module):
    """One linear layer per shape of `SUBSET` (a plain module: save_merged writes model.safetensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({f"o{r}_i{c}": nn.Linear(c, r) for r, c in SUBSET})
        with torch.no_grad():
            for linear in self.layers.values():
                weight, bias = weights(linear.out_features, linear.in_features)
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)


def four_bit_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, bnb_backend.Linear4bit):
            yield name, module


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_save_merged_writes_the_reference_weights(
    dequant_path: str, quant_type: str, double_quant: bool, tmp_path: Path
) -> None:
    model = Stack()
    replace_linear_layers(model, config(quant_type, double_quant), torch.float32)
    bases = {name: reference_weight(quantized_weight_state(layer)) for name, layer in four_bit_layers(model)}
    assert len(bases) == len(SUBSET)

    base_only = load_file(save_merged(model, tmp_path / "base", with_adapters=False) / "model.safetensors")
    for name, expected in bases.items():
        assert torch.equal(base_only[f"{name}.weight"], expected), name

    inject_adapters(model, LoRAConfig(r=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    deltas = {}
    for name, adapter in adapter_modules(model):
        with torch.no_grad():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.1)
        deltas[name] = adapter.delta_weight()
    merged = load_file(save_merged(model, tmp_path / "merged", dtype=torch.bfloat16) / "model.safetensors")
    for name, expected in bases.items():
        assert torch.equal(merged[f"{name}.weight"], (expected + deltas[name]).to(torch.bfloat16)), name


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_loftq_residual_is_the_reference_residual(
    dequant_path: str, quant_type: str, double_quant: bool
) -> None:
    r, scaling = 4, 2.0
    for rows, cols in SUBSET:
        weight, bias = weights(rows, cols)
        linear = nn.Linear(cols, rows)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        start = loftq_init(linear, config(quant_type, double_quant), r=r, scaling=scaling)
        residual = weight - reference_weight(quantized_weight_state(start.base))
        norm = float(torch.linalg.vector_norm(weight))
        assert start.plain_error == pytest.approx(float(torch.linalg.vector_norm(residual)) / norm, rel=1e-6)
        assert start.plain_error < 0.2  # the right decode: about 0.09 for NF4 (0.25 with per-row scales)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        k = min(r, s.numel())
        best = (u[:, :k] * s[:k]) @ vh[:k]  # what LoftQ's adapters start from: the rank-r residual
        torch.testing.assert_close(scaling * start.lora_b @ start.lora_a, best, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_load_quantized_and_its_state_dict_decode_to_the_reference(
    dequant_path: str, quant_type: str, double_quant: bool, tmp_path: Path
) -> None:
    save_file(Stack().state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):
        model = Stack()
    names = load_quantized(model, tmp_path / "model.safetensors", config(quant_type, double_quant))
    assert len(names) == len(SUBSET)
    saved = {k: v.contiguous() for k, v in model.state_dict().items()}
    again = Stack()
    replace_linear_layers(again, config("nf4" if quant_type == "fp4" else "fp4", not double_quant))
    again.load_state_dict(saved)  # the packed form, read back into layers of another format
    g = torch.Generator().manual_seed(2)
    for loaded in (model, again):
        for name, layer in four_bit_layers(loaded):
            tensors = quantized_weight_state(layer)
            original = weights(layer.out_features, layer.in_features)[0]
            assert within_quantization_error(original, tensors, quant_type), name
            reference = reference_weight(tensors)
            prefix = f"{name}."
            in_file = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix + "weight")}
            assert torch.equal(reference, reference_weight(in_file)), name
            x = torch.randn(3, layer.in_features, generator=g)
            with torch.no_grad():
                assert torch.equal(layer(x), F.linear(x, reference, layer.bias)), name


# ------------------------------------------------------------------------------- the routing itself


def test_bitsandbytes_cpu_decode_is_wrong_for_rows_ending_inside_a_block_on_avx512(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bnb_backend, "_bitsandbytes_cpu_has_avx512f", lambda: True)
    wrong = [n for n in ROW_LENGTHS if bnb_backend.bitsandbytes_cpu_decode_is_wrong(n, 64)]
    assert len(wrong) == 51  # 68 multiples of 16 up to 1096, less the 17 multiples of 64
    assert wrong[:5] == [16, 32, 48, 80, 96]
    assert 688 in wrong and 344 not in wrong and 4096 not in wrong
    assert bnb_backend.bitsandbytes_cpu_decode_is_wrong(96, 128)
    assert not bnb_backend.bitsandbytes_cpu_decode_is_wrong(96, 32)

    # Such a layer decodes through the package, which says so once per shape at debug level.
    bnb_backend._log_own_decode.cache_clear()
    layer = four_bit(3, 688, "nf4", True)
    with caplog.at_level(logging.DEBUG, logger=bnb_backend.__name__):
        first = dequantize_weight(layer, torch.float32)
        dequantize_weight(layer, torch.float32)
    lines = [r.getMessage() for r in caplog.records if "688" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "bitsandbytes" in lines[0] and "blocks of 64" in lines[0]
    assert torch.equal(first, reference_weight(quantized_weight_state(layer)))

    monkeypatch.setattr(bnb_backend, "_bitsandbytes_cpu_has_avx512f", lambda: False)
    assert not any(bnb_backend.bitsandbytes_cpu_decode_is_wrong(n, 64) for n in ROW_LENGTHS)


def test_the_package_never_calls_bitsandbytes_cpu_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, whatever bitsandbytes' decode would give, the package's paths do not ask it."""

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("bitsandbytes' dequantize_4bit was called on CPU")

    monkeypatch.setattr(bnb_backend, "dequantize_4bit", refuse)
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", refuse)
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(bnb_backend, "cpu_kernel", lambda: None)
        for rows, cols in SUBSET:
            layer = four_bit(rows, cols, "nf4", True)
            reference = reference_weight(quantized_weight_state(layer))
            assert torch.equal(dequantize_weight(layer, torch.float32), reference)
            x = torch.randn(2, cols, requires_grad=True)
            layer(x).sum().backward()
