"""bitsandbytes 0.50.2: CPU `dequantize_4bit` is wrong on AVX-512 CPUs for rows that end inside a block.

Symptom: `quantize_4bit(w, blocksize=64)` of a (rows, n) weight, then `dequantize_4bit` on a CPU with
AVX-512F, returns other values than were encoded when n is a multiple of 16 but not of 64 (16, 32, 48,
80, ..., 688, 720, ...): relative error to `w` about 0.25 instead of 0.09. `Linear4bit.forward` on CPU,
and so transformers + PEFT on CPU, inherit it. Other row lengths, and every row length on CPUs without
AVX-512F, are exact.

Cause (read from the 0.50.2 wheel's libbitsandbytes_cpu.so, `dequantizeBlockwise4bitCpu<T, DATA_TYPE>`):
when the CPU has AVX-512F, blocksize > 15 and n % 16 == 0, the kernel takes a vector path that decodes
16 values at a time and scales them by

    absmax[row * (n / blocksize) + col / blocksize]        (integer divisions)

as if every row started a new block. `quantize_4bit` numbers blocks over the flattened tensor,
block = (row * n + col) / blocksize, so when n % blocksize != 0 every row after the first reads other
blocks' scales (and for n < blocksize, every row reads block 0's). The scalar path (other CPUs, or
n % 16 != 0) indexes the flat way and is right. Fix: `absmax[(row * n + col) / blocksize]` in the vector
path; with n and blocksize multiples of 16, a 16-value chunk never straddles two blocks.

Below, `ref` is the format's definition in plain torch (code table x the absmax of the value's block of 64
in the flattened tensor) and `per_row` emulates the vector path's indexing. On an AVX-512F CPU, bnb should
equal `per_row` for the multiples of 16 (for 64 and 1024 the two indexings agree) and `ref` for 344 (an odd
multiple of 8: scalar path); on other CPUs it equals `ref` everywhere. Run: python bnb_cpu_dequant_repro.py
"""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from bitsandbytes.cextension import lib

print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, AVX-512F: {bool(lib.has_avx512f_cpu())}")
print("    n  max|bnb-ref|  max|bnb-per_row|  rel.err ref  rel.err bnb  rel.err per_row")
torch.manual_seed(0)
rows, bs = 32, 64


def err(x: torch.Tensor, w: torch.Tensor) -> float:
    return float((x - w).norm() / w.norm())


for n in (64, 1024, 344, 16, 48, 80, 688, 720):
    w = torch.randn(rows, n) * 0.05
    q, state = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=False)
    bnb_out = F.dequantize_4bit(q, state)
    codes = state.code[torch.stack((q.view(-1) >> 4, q.view(-1) & 15), 1).view(-1).long()]
    ref = (codes * state.absmax.repeat_interleave(bs)[: rows * n]).view(rows, n)
    block_per_row = torch.arange(rows)[:, None] * (n // bs) + torch.arange(n) // bs
    per_row = codes.view(rows, n) * state.absmax[block_per_row]
    print(
        f"{n:5d}  {(bnb_out - ref).abs().max():12.4f}  {(bnb_out - per_row).abs().max():16.4f}"
        f"  {err(ref, w):11.3f}  {err(bnb_out, w):11.3f}  {err(per_row, w):15.3f}"
    )
