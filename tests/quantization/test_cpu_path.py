"""The CPU compute path of 4-bit layers: exact against an fp32 layer holding the dequantized weight,
nothing dequantized kept, a shared workspace that never mixes layers up, and Linear4bit to the outside."""

from __future__ import annotations

import threading
from collections.abc import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from lightning_qlora.quantization import QuantizationConfig
from lightning_qlora.quantization.backends import bitsandbytes as bnb_backend
from lightning_qlora.quantization.backends import get_backend, linear4bit_op
from lightning_qlora.quantization.layers import (
    dequantize_weight,
    quantize_layer,
    set_layer_compute_dtype,
    to_linear4bit,
)
from lightning_qlora.quantization.workspace import release_workspace, workspace, workspace_bytes


def four_bit(
    in_features: int,
    out_features: int,
    compute_dtype: torch.dtype = torch.float32,
    bias: bool = True,
    seed: int = 0,
    **config: object,
) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = to_linear4bit(linear, QuantizationConfig(**config), compute_dtype)  # type: ignore[arg-type]
    quantize_layer(layer)
    set_layer_compute_dtype(layer, compute_dtype)
    return layer


def reference(layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same layer as a plain linear map over its dequantized weight, in its compute dtype."""
    weight = dequantize_weight(layer)  # bitsandbytes' own dequantization, in the compute dtype
    bias = None if layer.bias is None else layer.bias.detach().clone()

    def forward(x: torch.Tensor) -> torch.Tensor:
        b = None if bias is None else bias.to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, b).to(x.dtype)

    return forward


@pytest.fixture(params=["kernel", "fallback"])
def dequant_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways `dequantize_into` can go: the native kernel (where it is available) and bitsandbytes'."""
    if request.param == "fallback":
        monkeypatch.setattr(bnb_backend, "cpu_kernel", lambda: None)
    elif bnb_backend.cpu_kernel() is None:
        pytest.skip("the native CPU dequantization kernel is not available here")
    return str(request.param)


def test_layer_is_a_linear4bit_and_runs_the_workspace_path_on_cpu() -> None:
    layer = four_bit(64, 48)
    assert isinstance(layer, bnb.nn.Linear4bit)
    x = torch.randn(2, 64, requires_grad=True)
    expected = "_FrozenLinearBackward"  # the Python band loop, or the native operator where it is built
    if linear4bit_op.available():
        expected = "GeneratedBackwardFor_lightning_qlora_linear4bit_defaultBackward"
    assert type(layer(x).grad_fn).__name__ == expected


def test_forward_and_input_gradient_equal_an_fp32_linear(dequant_path: str) -> None:
    # Same operation (F.linear, then grad @ W) on the same numbers: equal, not merely close.
    layer = four_bit(96, 40, quant_type="nf4", double_quant=True)
    ref = reference(layer)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = layer(x), ref(x_ref)
    assert torch.equal(out, out_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    assert x.grad is not None and torch.equal(x.grad, x_ref.grad)


def flat_reference(layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' decode in plain torch over the flat block layout quantize_4bit writes."""
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    n = layer.in_features * layer.out_features
    packed = layer.weight.data.view(-1)
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    return (state.code[idx] * scale).to(dtype).view(layer.out_features, layer.in_features)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(33, 130), (64, 64), (40, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_is_bitsandbytes_arithmetic(
    dequant_path: str, quant_type: str, double_quant: bool, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    layer = four_bit(shape[1], shape[0], quant_type=quant_type, double_quant=double_quant)
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert get_backend().dequantize_into(layer, out) is out
    expected = flat_reference(layer, dtype)
    assert torch.equal(out + 0.0, expected + 0.0)  # (+0.0: FP4's zero code may come out as -0.0)
    if shape[1] % 64 == 0:  # rows start on block boundaries: bitsandbytes' public function agrees
        public = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        assert torch.equal(out + 0.0, public + 0.0)


def test_rows_ending_inside_a_block_decode_to_the_quantized_weight(dequant_path: str) -> None:
    # 96 inputs per row, blocks of 64: bitsandbytes 0.50.2's AVX-512 path indexes absmax per row here
    # and decodes other weights; the backend follows the layout quantize_4bit wrote.
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False)
    original = linear.weight.detach().clone()
    layer = to_linear4bit(linear, QuantizationConfig(double_quant=False), torch.float32)
    quantize_layer(layer)
    weight = dequantize_weight(layer)
    blocks = original.flatten().view(-1, 64)
    # NF4's widest gap between neighbouring codes is 0.304 (between -1 and -0.696): a correctly decoded
    # weight is within half of it, times its block's absmax
    step = blocks.abs().amax(dim=1, keepdim=True) * 0.16
    assert ((weight.flatten().view(-1, 64) - blocks).abs() <= step).all()
    public = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if not torch.equal(public, weight):  # AVX-512 machines: the public function's per-row indexing
        assert not ((public.flatten().view(-1, 64) - blocks).abs() <= step).all()


def test_frozen_weight_gets_no_gradient_and_bias_keeps_its_dtype() -> None:
    layer = four_bit(32, 16, compute_dtype=torch.bfloat16)
    weight = layer.weight
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight is weight and not weight.requires_grad and weight.grad is None
    # bitsandbytes' own forward would have cast the bias to bf16 in place
    assert layer.bias is not None and layer.bias.dtype == torch.float32
    assert "bias" in layer.state_dict() and layer.state_dict()["bias"].dtype == torch.float32


def test_trainable_bias_gets_its_gradient() -> None:
    layer = four_bit(32, 16)
    assert layer.bias is not None
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 32)
    layer(x).sum().backward()
    assert layer.bias.grad is not None
    assert torch.equal(layer.bias.grad, torch.full((16,), 6.0))


def test_bf16_compute_matches_a_bf16_linear() -> None:
    layer = four_bit(64, 24, compute_dtype=torch.bfloat16)
    ref = reference(layer)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 64, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, out_ref = layer(x), ref(x_ref)
        assert out.dtype == dtype
        assert torch.equal(out, out_ref)
        out.sum().backward()
        out_ref.sum().backward()
        assert x.grad is not None and x.grad.dtype == dtype
        assert torch.equal(x.grad, x_ref.grad)


@pytest.fixture
def tiny_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of the fewest rows the layout allows, so small layers are multiplied in several bands."""
    if bnb_backend.cpu_kernel() is None:
        pytest.skip("the native CPU dequantization kernel is not available here")
    monkeypatch.setattr(bnb_backend, "TILE_BYTES_PER_THREAD", 1)
    release_workspace()


@pytest.mark.parametrize(
    ("in_features", "out_features", "double_quant", "bands"),
    [(96, 40, False, 20), (128, 300, True, 3), (192, 300, True, 2)],  # DQ bands start at 64 * 256 values
)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_band_by_band_equals_the_whole_weight(
    tiny_tiles: None,
    in_features: int,
    out_features: int,
    double_quant: bool,
    bands: int,
    compute_dtype: torch.dtype,
) -> None:
    layer = four_bit(in_features, out_features, compute_dtype, double_quant=double_quant)
    tiles = bnb_backend.BACKEND.weight_tiles(layer, compute_dtype)
    assert tiles is not None and -(-out_features // tiles.rows) == bands
    ref = reference(layer)
    x = torch.randn(2, 7, in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    # The same products, but BLAS may sum a narrow band in another order: equal up to rounding.
    tol = {"rtol": 1e-5, "atol": 1e-5} if compute_dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    out, out_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref, **tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    assert x.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out_ref, **tol)
    assert workspace_bytes() <= 8 * tiles.rows * in_features  # one band per dtype, not the whole weight


class Interleaved(nn.Module):
    """Two layers of one shape and dtype (they share a workspace buffer) around one of another dtype."""

    def __init__(self, layers: list[Callable[[torch.Tensor], torch.Tensor]], use_checkpoint: str) -> None:
        super().__init__()
        self.layers = layers
        self.use_checkpoint = use_checkpoint

    def block(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.layers
        return c(torch.tanh(b(torch.tanh(a(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint == "none":
            return self.block(x)
        return checkpoint(self.block, x, use_reentrant=self.use_checkpoint == "reentrant")


@pytest.mark.parametrize("use_checkpoint", ["none", "non-reentrant", "reentrant"])
def test_interleaved_layers_with_checkpointing_never_see_each_others_weight(use_checkpoint: str) -> None:
    a = four_bit(48, 80, seed=1)  # fp32, 80 x 48
    b = four_bit(80, 48, compute_dtype=torch.bfloat16, seed=2)  # bf16, 48 x 80: a buffer of its own
    c = four_bit(48, 80, seed=3)  # fp32, same shape as `a`: reuses a's buffer
    assert not torch.equal(dequantize_weight(a), dequantize_weight(c))
    model = Interleaved([a, b, c], use_checkpoint)
    ref = Interleaved([reference(a), reference(b), reference(c)], "none")
    for _ in range(2):  # the second step starts from buffers the first left behind
        x = torch.randn(6, 48, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, out_ref = model(x), ref(x_ref)
        assert torch.equal(out, out_ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        out_ref.backward(grad)
        assert x.grad is not None and torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_validation_without_grad_then_training_again(mode: Callable[[], object]) -> None:
    release_workspace()  # so the buffer is first made inside the no-grad / inference context
    layer = four_bit(40, 24)
    ref = reference(layer)
    x = torch.randn(3, 40)
    with mode():  # type: ignore[attr-defined]
        out = layer(x)
        assert out.grad_fn is None
        assert torch.equal(out, ref(x))
    x = torch.randn(3, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer(x).sum().backward()  # the buffer made under inference_mode is an ordinary tensor
    ref(x_ref).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, x_ref.grad)


def test_nothing_dequantized_is_saved_for_backward() -> None:
    layer = four_bit(256, 128)
    x = torch.randn(2, 256, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    # Not the dequantized weight, not even the input (the weight has no gradient): at most the native
    # operator's references to the layer's own packed weight and quantization constants.
    packed = bnb_backend._packed_weight(layer)
    own = {t.untyped_storage().data_ptr() for t in packed.op_args() if isinstance(t, torch.Tensor)}
    assert all(t.untyped_storage().data_ptr() in own for t in saved)
    out.sum().backward()


def test_workspace_is_one_buffer_per_dtype_grown_to_the_largest_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linear4bit_op, "available", lambda: False)  # the Python band loop's buffers
    release_workspace()
    small, large = four_bit(32, 16), four_bit(64, 48)
    large(torch.randn(1, 64))
    ptr = workspace((48, 64), torch.float32, torch.device("cpu")).data_ptr()
    small(torch.randn(1, 32))
    large(torch.randn(1, 64))
    assert workspace((16, 32), torch.float32, torch.device("cpu")).data_ptr() == ptr
    assert workspace_bytes() == 48 * 64 * 4
    four_bit(32, 16, compute_dtype=torch.bfloat16)(torch.randn(1, 32))
    assert workspace_bytes() == 48 * 64 * 4 + 16 * 32 * 2

    other: list[int] = []
    thread = threading.Thread(
        target=lambda: other.append(workspace((48, 64), torch.float32, torch.device("cpu")).data_ptr())
    )
    thread.start()
    thread.join()
    assert other and other[0] != ptr  # each thread has its own


def test_state_dict_is_linear4bits_and_loads_back() -> None:
    layer = four_bit(64, 32)
    plain = bnb.nn.Linear4bit(64, 32, compress_statistics=True, quant_type="nf4")
    plain.load_state_dict({"weight": torch.randn(32, 64), "bias": torch.randn(32)}, strict=False)
    plain.weight = plain.weight._quantize("cpu")
    assert list(layer.state_dict()) == list(plain.state_dict())
    fresh = four_bit(64, 32, seed=7)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), layer(x))


def test_peft_wraps_it_as_a_4bit_layer_and_trains_through_it() -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    class Net(nn.Module):
        is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT reads it

        def __init__(self) -> None:
            super().__init__()
            self.proj = four_bit(64, 32)
            self.head = nn.Linear(32, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.proj(x))

    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    wrapped = model.base_model.model.proj
    assert isinstance(wrapped, PeftLinear4bit)
    x = torch.randn(3, 64, requires_grad=True)
    model(x).sum().backward()
    assert wrapped.lora_B["default"].weight.grad is not None
    assert wrapped.base_layer.weight.grad is None


@pytest.mark.cuda
def test_cuda_keeps_bitsandbytes_kernels() -> None:
    layer = four_bit(64, 48, compute_dtype=torch.bfloat16).cuda()
    twin = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.bfloat16, quant_type="nf4")
    twin.weight, twin.bias = layer.weight, layer.bias
    release_workspace()
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ != "_FrozenLinearBackward"
    assert torch.equal(out, bnb.nn.Linear4bit.forward(twin, x))
    out.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    assert workspace_bytes() == 0  # no CPU workspace was touched


@pytest.mark.cuda
def test_cuda_forward_close_to_dequantized_linear() -> None:
    layer = four_bit(128, 64, compute_dtype=torch.float32).cuda()
    x = torch.randn(8, 128, device="cuda")
    weight = dequantize_weight(layer, torch.float32)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-4, atol=1e-4)


class LargestOutput(TorchDispatchMode):
    """The largest new tensor any torch operation makes (views and in-place writes make none)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view, or an in-place / out= write into an existing tensor
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_no_full_size_allocation_per_call(dequant_path: str) -> None:
    # Larger than the fallback's decode chunk (2**20 values), so a bounded temporary is smaller than it.
    layer = four_bit(1024, 2048, bias=False)
    full_size = 2048 * 1024 * 4
    x = torch.randn(2, 1024, requires_grad=True)
    layer(x).sum().backward()  # the workspace exists from here on
    with LargestOutput() as mode:
        layer(x).sum().backward()
    assert mode.largest < full_size
    with LargestOutput() as mode:  # bitsandbytes' own forward: a fresh dequantized weight per call
        bnb.nn.Linear4bit.forward(layer, x).sum().backward()
    assert mode.largest >= full_size
