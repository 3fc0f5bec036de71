"""A pure-PyTorch decoder of bitsandbytes' 4-bit format, written from the format's definition.

The tests compare every dequantizing path of the package with this, never with bitsandbytes alone:
bitsandbytes 0.50.2's own CPU `dequantize_4bit` is wrong on AVX-512 CPUs for rows that end inside a
block (docs/interop.md), so agreeing with it proves nothing there.

The format, as `quantize_4bit` writes it and a state dict stores it (keys relative to the layer):

- ``weight``: uint8, two 4-bit codes per byte, the first value in the high nibble, over the weight
  flattened row by row (a row need not start a block);
- ``weight.absmax``: one scale per block of ``blocksize`` consecutive values of that flat weight; with
  double quantization, an 8-bit code per block, and the scale is
  ``dynamic_map[code] * nested_absmax[block // nested_blocksize] + nested_offset`` (fp32);
- value = ``table[code] * scale`` in fp32, rounded once to the output dtype, where the table is NF4
  (the QLoRA paper's 16 levels) or FP4 (bitsandbytes' 4-bit float: 1 sign, 2 exponent, 1 mantissa bits,
  scaled to a maximum of 1);
- ``weight.quant_state.bitsandbytes__<type>``: the JSON of type, blocksize, shape and the nested settings.

The stored code tables (``quant_map``, ``nested_quant_map``) are checked against the tables below rather
than trusted.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

import torch

# QLoRA paper, Appendix E: the 16 levels of 4-bit NormalFloat.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' FP4 in code order: magnitudes 0, 0.0625 (subnormal), 8, 12, 4, 6, 2, 3, then the same
# negated, divided by the largest (12).
FP4 = tuple(v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))
TABLES = {"nf4": NF4, "fp4": FP4}


@functools.cache
def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map double quantization uses (Dettmers 2016, "8-bit approximations").

    A value is a sign, a decimal exponent 10^-6 ... 10^0 and a linear fraction: exponent i has 2^i
    fractions, the midpoints of 2^i equal steps over [0.1, 1]. With 0 and 1 that is 2 * 127 + 2 codes.
    """
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def table(quant_type: str) -> torch.Tensor:
    """The 16 values of a 4-bit type as an fp32 tensor, in code order."""
    return torch.tensor(TABLES[quant_type], dtype=torch.float32)


def format_settings(tensors: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """The JSON a packed 4-bit weight stores its type, blocksize, shape and nested settings in."""
    (key,) = [k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")]
    settings: dict[str, object] = json.loads(bytes(tensors[key].tolist()))
    return settings


def block_scales(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One fp32 scale per block of the flat weight (decoding the 8-bit codes under double quantization)."""
    settings = format_settings(tensors)
    absmax = tensors["weight.absmax"]
    if "nested_blocksize" not in settings:
        return absmax.float()
    code8 = dynamic_map()
    assert torch.equal(tensors["weight.nested_quant_map"], code8)
    nested = tensors["weight.nested_absmax"].float()
    index = torch.arange(absmax.numel()) // int(settings["nested_blocksize"])  # type: ignore[call-overload]
    offset = torch.tensor(float(settings["nested_offset"]), dtype=torch.float32)  # type: ignore[arg-type]
    return code8[absmax.long()] * nested[index] + offset


def reference_weight(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight a packed 4-bit weight encodes, from its state-dict tensors (see module doc)."""
    settings = format_settings(tensors)
    values = table(str(settings["quant_type"]))
    assert torch.equal(tensors["weight.quant_map"].float(), values)
    rows, cols = settings["shape"]  # type: ignore[misc]
    n = rows * cols
    packed = tensors["weight"].reshape(-1).view(torch.uint8)
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)[:n].long()
    block = torch.arange(n) // int(settings["blocksize"])  # type: ignore[call-overload]
    return (values[codes] * block_scales(tensors)[block]).to(dtype).view(rows, cols)
