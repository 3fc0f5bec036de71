"""The bitsandbytes backend: NF4/FP4 with optional double quantization, and the only module that
touches bitsandbytes' internals (`Params4bit`, `quant_state`, `bnb_quantized`, private helpers).

Layers are `QLoRALinear4bit`, a `bitsandbytes.nn.Linear4bit` subclass: PEFT, transformers and
`isinstance` checks see a Linear4bit, state dicts have Linear4bit's keys, CUDA runs bitsandbytes' own
kernels. Two things are added. On CPU the forward runs `frozen_linear`, which dequantizes into a reused
workspace (through the native kernel of `cpu_kernel` where it is available, a band of rows at a time,
else a chunked plain-torch decode; both follow the flat block layout `quantize_4bit` writes) and keeps
nothing dequantized for backward. And the layer reads its own state dict back (bitsandbytes writes the
quant-state keys but does not load them: its issue 1946).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

from lightning_qlora._bnb import bitsandbytes
from lightning_qlora.quantization.backends.base import QuantizationFormat
from lightning_qlora.quantization.backends.linear4bit_op import PackedWeight4bit
from lightning_qlora.quantization.frozen_linear import WeightTiles, frozen_linear

bitsandbytes()  # a missing install fails here with a message that names the fix
# ruff: noqa: E402 - the imports below come after that check
from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise
from bitsandbytes.nn import Linear4bit, Params4bit
from bitsandbytes.nn.modules import (
    _convert_weight_packed_for_cpu_inverse,
    fix_4bit_weight_quant_state_from_module,
)

log = logging.getLogger(__name__)

NAME = "bitsandbytes"
# Bytes of dequantized weight per band of rows the CPU path dequantizes and multiplies at once, per
# thread. Smaller bands lose time to many small matmuls and single-threaded dequantization, larger ones
# gain nothing (measured: benchmarks/README.md).
TILE_BYTES_PER_THREAD = 8 << 20


class QLoRALinear4bit(Linear4bit):
    """A `bitsandbytes.nn.Linear4bit` whose CPU forward and backward dequantize into a reused workspace.

    On CUDA (or with a weight bitsandbytes repacked for CPU inference) it is Linear4bit's own forward.
    On CPU the bias stays in its own dtype: Linear4bit casts it in place to the compute dtype on the
    first forward, which would change a saved checkpoint's dtype behind the user's back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _params(self)
        if (
            x.device.type != "cpu"
            or not getattr(weight, "bnb_quantized", False)
            or getattr(weight.quant_state, "packing_format_for_cpu", False)
        ):
            return cast(torch.Tensor, super().forward(x))
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        dtype = self.compute_dtype if self.compute_dtype is not None else x.dtype
        tiles = BACKEND.weight_tiles(self, dtype)
        return frozen_linear(x, self, BACKEND.dequantize_into, dtype, self.bias, tiles)


@functools.cache
def cpu_kernel() -> ModuleType | None:
    """The native CPU dequantization kernel module if it can be used here, else None (logged once)."""
    try:
        module = importlib.import_module("lightning_qlora.quantization.backends.cpu_kernel")
    except ImportError as err:
        log.info("lightning-qlora: no native CPU dequantization kernel (%s); decoding in plain torch.", err)
        return None
    if not module.kernel_available():
        return None
    return module


def bitsandbytes_cpu_decode_is_wrong(in_features: int, blocksize: int) -> bool:
    """True where bitsandbytes' own CPU `dequantize_4bit` (so `Linear4bit.forward`, and transformers +
    PEFT on CPU) decodes a weight with rows of `in_features` values to other values than were quantized.

    On CPUs with AVX-512F its kernel takes a vector path for rows of a multiple of 16 values, and that
    path reads the scale of block ``row * (in_features // blocksize) + column // blocksize``: right only
    if every row starts a block. `quantize_4bit` numbers blocks over the flattened weight, so rows that end
    inside a block (16, 32, 48, 80, ..., 688 values with blocks of 64) get their neighbours' scales. Other
    rows, and every row on other CPUs, take its scalar path, which is right. Read from bitsandbytes 0.50.2's
    CPU library; see docs/interop.md.
    """
    return (
        in_features % 16 == 0
        and blocksize >= 16
        and in_features % blocksize != 0
        and _bitsandbytes_cpu_has_avx512f()
    )


@functools.cache
def _bitsandbytes_cpu_has_avx512f() -> bool:
    """The check bitsandbytes' CPU library makes before its AVX-512 decode (torch's view if it has none)."""
    from bitsandbytes.cextension import lib

    probe = getattr(lib, "has_avx512f_cpu", None)
    if probe is not None:
        try:
            return bool(probe())
        except (OSError, RuntimeError):  # bitsandbytes without its native library
            pass
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _bitsandbytes_decodes(data: torch.Tensor, state: QuantState, in_features: int) -> bool:
    """Whether bitsandbytes' `dequantize_4bit` decodes this weight: on its GPU backends only.

    On CPU the package always decodes itself (the native kernel, else a plain-torch decode): bitsandbytes'
    CPU decode allocates a fresh output per call, and is wrong on AVX-512 CPUs for rows ending inside a
    block (`bitsandbytes_cpu_decode_is_wrong`); such shapes are named in one debug line.
    """
    if data.device.type != "cpu":
        return True
    if in_features % state.blocksize and bitsandbytes_cpu_decode_is_wrong(in_features, state.blocksize):
        _log_own_decode(in_features, state.blocksize)
    return False


@functools.cache
def _log_own_decode(in_features: int, blocksize: int) -> None:
    log.debug(
        "lightning-qlora: rows of %d values end inside blocks of %d, which bitsandbytes' CPU "
        "dequantize_4bit decodes wrongly on this (AVX-512) CPU; these layers use the package's decode.",
        in_features,
        blocksize,
    )


@torch.compiler.assume_constant_result
def _kernel_loaded() -> bool:
    """`cpu_kernel()` is not None, as a constant to torch.compile (which cannot trace an import)."""
    return cpu_kernel() is not None


@torch.compiler.assume_constant_result
def _torch_threads() -> int:
    """`torch.get_num_threads()`, as a constant to torch.compile (a compiled graph keeps its bands)."""
    return torch.get_num_threads()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs on which bf16 matmuls are fast."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:  # pragma: no cover - older bitsandbytes
        return False
    return bool(has_avx512bf16())


class BitsandbytesBackend:
    """NF4/FP4 through bitsandbytes (CPU and CUDA)."""

    name = NAME

    def cpu_has_native_bf16(self) -> bool:
        return cpu_has_native_bf16()

    def make_layer(
        self, linear: nn.Linear, config: QuantizationFormat, compute_dtype: torch.dtype | None
    ) -> nn.Linear:
        weight = linear.weight
        layer = QLoRALinear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
        layer.weight = Params4bit(
            weight.data,
            requires_grad=False,
            blocksize=config.blocksize,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=torch.uint8,
            module=cast(Linear4bit, layer),
        )
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        layer.train(linear.training)
        # bitsandbytes repacks weights in place for AVX512-BF16 CPU inference (eval mode, no grad). That
        # switches the storage format between training and validation steps, forces bf16, and fails for
        # layers narrower than a block; one format throughout keeps state dicts, merges and numerics stable.
        layer.support_avx512bf16_for_cpu = False
        return layer

    def set_full_precision_weight(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        current = _params(layer)
        layer.weight = Params4bit(
            weight.detach(),
            requires_grad=False,
            blocksize=current.blocksize,
            compress_statistics=current.compress_statistics,
            quant_type=current.quant_type,
            quant_storage=torch.uint8,
            module=cast(Linear4bit, layer),
        )

    def quantize(self, layer: nn.Linear, device: torch.device | None) -> None:
        weight = _params(layer)
        if getattr(weight, "bnb_quantized", False) or _is_sharded(layer):
            return
        target = device if device is not None else weight.device
        if target.type == "meta":
            raise RuntimeError("Cannot quantize a weight on the meta device: load real weights first.")
        layer.weight = weight._quantize(target)  # what Params4bit.to() runs, without a copy of the rest
        bias = layer.bias
        if bias is not None and bias.device not in (target, torch.device("meta")):
            layer.bias = nn.Parameter(bias.data.to(target), requires_grad=False)

    def is_4bit_layer(self, module: nn.Module) -> bool:
        return isinstance(module, Linear4bit)

    def is_quantized(self, layer: nn.Linear) -> bool:
        quantized = bool(getattr(layer.weight, "bnb_quantized", False)) or _is_sharded(layer)
        return self.is_4bit_layer(layer) and quantized

    def logical_shape(self, tensor: torch.Tensor) -> torch.Size | None:
        state = getattr(tensor, "quant_state", None)
        if getattr(tensor, "bnb_quantized", False) and state is not None and state.shape is not None:
            return torch.Size(state.shape)
        return None

    def dequantize(self, layer: nn.Linear, dtype: torch.dtype | None) -> torch.Tensor:
        weight = _params(layer)
        if not getattr(weight, "bnb_quantized", False):
            return weight.data.to(dtype or weight.dtype, copy=True)
        data, state = _unpacked_for_cpu(weight)
        if _bitsandbytes_decodes(data, state, layer.in_features):
            full = dequantize_4bit(data, state)
            return full.to(dtype) if dtype is not None else full
        # On CPU the same decode as the forward pass, so merges and exports match what was trained.
        out = torch.empty(layer.out_features, layer.in_features, dtype=dtype or state.dtype)
        return self.dequantize_into(layer, out)

    def weight_tiles(self, layer: nn.Linear, dtype: torch.dtype) -> WeightTiles | None:
        """Bands of rows of about `TILE_BYTES_PER_THREAD` bytes of `dtype` per torch thread that the native
        kernel can write on their own (a band starts a block of nested blocks), so each band's
        dequantization and matmul use every thread; None where only whole weights can be dequantized."""
        if not _kernel_loaded():
            return None
        state = _state(_params(layer))
        step = state.blocksize * (state.state2.blocksize if state.nested else 1)
        cols = layer.in_features
        align = step // math.gcd(cols, step)  # rows * cols is a multiple of step
        values = TILE_BYTES_PER_THREAD * _torch_threads() // dtype.itemsize
        rows = max(align, values // cols // align * align)
        return WeightTiles(rows, self.dequantize_into, _packed_weight(layer))

    def dequantize_into(self, layer: nn.Linear, out: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """The weight (or, from `first_row`, as many rows as `out` holds: the native kernel only)."""
        data, state = _unpacked_for_cpu(_params(layer))
        partial = first_row != 0 or out.numel() != layer.out_features * layer.in_features
        if _bitsandbytes_decodes(data, state, layer.in_features):
            out.copy_(dequantize_4bit(data, state).view(out.shape))
            return out
        kernel = cpu_kernel()
        if kernel is None:
            if partial:
                raise ValueError("dequantize_into: rows of a weight need the native CPU kernel.")
            return _dequantize_flat_into(data, state, out)
        nested = state.state2 if state.nested else None
        kernel.dequantize_4bit_into(
            data,
            state.code,
            state.absmax,
            state.blocksize,
            out,
            nested_code=nested.code if nested is not None else None,
            nested_absmax=nested.absmax if nested is not None else None,
            nested_blocksize=nested.blocksize if nested is not None else 256,
            offset=float(state.offset) if nested is not None else 0.0,
            begin=first_row * layer.in_features,
            total=layer.out_features * layer.in_features,
        )
        return out

    def set_compute_dtype(self, layer: nn.Linear, dtype: torch.dtype) -> None:
        four_bit = cast(Linear4bit, layer)
        four_bit.compute_dtype = dtype
        four_bit.compute_type_is_set = True
        for state in (getattr(layer.weight, "quant_state", None), getattr(layer, "quant_state", None)):
            if state is not None:
                state.dtype = dtype

    def storage_bytes(self, layer: nn.Linear) -> int:
        weight = _params(layer)
        if not self.is_quantized(layer):
            return _expected_bytes(weight, layer.in_features * layer.out_features)
        state = _state(weight) if not _is_sharded(layer) else cast(QuantState, layer.quant_state)
        total = weight.numel() * weight.element_size() + _nbytes(state.absmax)
        if state.nested:
            total += _nbytes(state.state2.absmax) + _nbytes(state.offset)
        return total

    def state_dict_tensors(self, layer: nn.Linear) -> dict[str, torch.Tensor]:
        weight = _params(layer)
        tensors = {"weight": weight.data}
        for key, value in _state(weight).as_dict(packed=True).items():
            tensors["weight." + key] = value
        return tensors

    def load_from_state_dict(self, layer: nn.Linear, state_dict: Mapping[str, Any], prefix: str) -> None:
        assert isinstance(state_dict, dict)
        key = prefix + "weight"
        if key not in state_dict:
            return
        stats_prefix = key + "."
        stats = {
            k[len(stats_prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(stats_prefix)
        }
        incoming = state_dict[key]
        current = layer.weight
        device = current.device if current.device.type != "meta" else incoming.device
        if stats:
            layer.weight = Params4bit.from_prequantized(
                data=incoming,
                quantized_stats=stats,
                requires_grad=False,
                device=device,
                module=cast(Linear4bit, layer),
            )
        elif incoming.dim() == 2 and tuple(incoming.shape) == (layer.out_features, layer.in_features):
            self.set_full_precision_weight(layer, incoming.to(device, copy=incoming.device == device))
            self.quantize(layer, device)
        else:
            return  # let PyTorch report the shape mismatch
        state_dict[key] = layer.weight.data


BACKEND = BitsandbytesBackend()


def _params(layer: nn.Linear) -> Params4bit:
    """The layer's packed weight with its quant state.

    FSDP2 (the "qlora_fsdp" strategy) hands the module a plain tensor gathered from the shards, without
    the `Params4bit` attributes; bitsandbytes keeps the quant state on the module too, and
    `fix_4bit_weight_quant_state_from_module` re-wraps the gathered bytes around it (without a copy).
    """
    weight = layer.weight
    if (
        not isinstance(weight, Params4bit)
        and not _is_dtensor(weight)
        and getattr(layer, "quant_state", None) is not None
    ):
        fix_4bit_weight_quant_state_from_module(cast(Linear4bit, layer))
        weight = layer.weight
    return cast(Params4bit, weight)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


def _is_sharded(layer: nn.Linear) -> bool:
    """A quantized weight FSDP2 split across processes: its quant state lives on the module."""
    return _is_dtensor(layer.weight) and getattr(layer, "quant_state", None) is not None


def _state(weight: Params4bit) -> QuantState:
    state = weight.quant_state
    if state is None:
        raise RuntimeError("This Linear4bit weight is not quantized yet (it has no quant_state).")
    return state


def _unpacked_for_cpu(weight: Params4bit) -> tuple[torch.Tensor, QuantState]:
    """The packed codes and state in bitsandbytes' portable layout (undoing its AVX512 CPU repacking)."""
    data, state = weight.data, _state(weight)
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return data, state


def _packed_weight(layer: nn.Linear) -> PackedWeight4bit:
    """The layer's 4-bit weight as plain tensors, for the native CPU operator."""
    data, state = _unpacked_for_cpu(_params(layer))
    nested = state.state2 if state.nested else None
    return PackedWeight4bit(
        packed=data.view(-1),
        code=state.code,
        absmax=state.absmax,
        blocksize=state.blocksize,
        shape=(layer.out_features, layer.in_features),
        nested_code=nested.code if nested is not None else None,
        nested_absmax=nested.absmax if nested is not None else None,
        nested_blocksize=nested.blocksize if nested is not None else 256,
        offset=state.offset if nested is not None else None,
    )


# Values decoded per step of the torch fallback: bounds its temporaries (indices, scales) to a few MiB.
_CHUNK = 1 << 20


def _dequantize_flat_into(data: torch.Tensor, state: QuantState, out: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 4-bit decode in plain torch, written into `out` chunk by chunk.

    The CPU fallback when the native kernel is unavailable. Not `dequantize_4bit`: it allocates the whole
    output on every call, and on AVX-512 CPUs it decodes rows that end inside a block to other weights
    than `quantize_4bit` encoded (`bitsandbytes_cpu_decode_is_wrong`). This follows the flat block layout
    `quantize_4bit` writes, with the same arithmetic as bitsandbytes' generic implementation (code value
    times fp32 absmax, one rounding to the output dtype), so it is bit-identical to it and to the native
    kernel.
    """
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    code = state.code.to(torch.float32)
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # byte -> (high, low) values
    packed = data.view(-1)
    flat = out.view(-1)
    n, blocksize = flat.numel(), state.blocksize
    step = max(_CHUNK - _CHUNK % (2 * blocksize), 2 * blocksize)  # whole blocks and whole bytes per chunk
    for start in range(0, n, step):
        stop = min(start + step, n)
        values = pairs.index_select(0, packed[start // 2 : (stop + 1) // 2].int()).view(-1)
        first, full = start // blocksize, (stop - start) // blocksize
        whole = full * blocksize
        if full:
            torch.mul(
                values[:whole].view(full, blocksize),
                absmax[first : first + full].unsqueeze(1),
                out=flat[start : start + whole].view(full, blocksize),
            )
        if start + whole < stop:  # the last, partial block
            torch.mul(values[whole : stop - start], absmax[first + full], out=flat[start + whole : stop])
    return out


def _expected_bytes(weight: torch.Tensor, n: int) -> int:
    """Storage a pending weight will take once packed: 4 bits plus its (double-)quantized absmax."""
    blocksize = int(getattr(weight, "blocksize", 64))
    blocks = -(-n // blocksize)
    if getattr(weight, "compress_statistics", True):
        return n // 2 + blocks + 4 * -(-blocks // 256) + 4
    return n // 2 + 4 * blocks


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
