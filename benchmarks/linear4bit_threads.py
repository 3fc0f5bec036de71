"""One 4-bit layer's forward + input gradient against an fp32 layer, at 1 and 2 threads, quiet and busy.

Why: where QLoRA's loss to 32-bit LoRA at all threads went, measured small enough to repeat many times on a
loaded machine. Three ways to compute ``x @ W.T`` and ``grad @ W`` for one frozen weight (Llama 0.5B's MLP
shape by default, 4096 x 1024, 256 tokens), interleaved in one process: ``fp32`` (an ``nn.Linear`` holding
the weight, what LoRA's base does), ``op`` (the package's 4-bit layer: the native operator on torch's
threads) and ``python_loop`` (the same layer through the Python band loop around the ctypes kernel, which
starts POSIX threads on every call: the path before the operator). Each round times every configuration
quiet and beside a process spinning on one core (``busy``), in alternating order; a round's ratios to
``fp32`` are paired, so drifting load from other programs cancels out of them. Reported: medians over
rounds of the per-round medians and ratios, with their range.

Run: ``python -m benchmarks.linear4bit_threads [--threads 1 2] [--rounds 5] [--iterations 5]``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.busy_core import LOADS, busy_core, default_core
from benchmarks.harness import base_parser, machine_info, markdown_table, report_written, write_results

NAME = "linear4bit_threads"
CONFIGS = ("fp32", "op", "python_loop")


def layers(args: argparse.Namespace) -> dict[str, Callable[[Any], Any]]:
    """The three configurations as functions of the input (forward only: the caller runs backward)."""
    import torch
    from torch import nn

    from lightning_qlora.quantization import QuantizationConfig
    from lightning_qlora.quantization.backends import linear4bit_op
    from lightning_qlora.quantization.backends.bitsandbytes import BACKEND
    from lightning_qlora.quantization.frozen_linear import frozen_linear
    from lightning_qlora.quantization.layers import quantize_layer, to_linear4bit

    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out_features, bias=False)
    fp32 = nn.Linear(args.in_features, args.out_features, bias=False).requires_grad_(False)
    fp32.weight.copy_(linear.weight)
    layer = to_linear4bit(linear, QuantizationConfig(), torch.float32)
    quantize_layer(layer)
    if not linear4bit_op.available():
        raise RuntimeError("the native 4-bit linear operator is not available here: nothing to compare")

    def python_loop(x: Any) -> Any:
        tiles = BACKEND.weight_tiles(layer, torch.float32)
        assert tiles is not None
        loop_tiles = dataclasses.replace(tiles, packed=None)  # no packed weight: the Python band loop
        return frozen_linear(x, layer, BACKEND.dequantize_into, torch.float32, None, loop_tiles)

    return {"fp32": fp32, "op": layer, "python_loop": python_loop}


def time_config(fn: Callable[[Any], Any], x: Any, grad: Any, iterations: int) -> tuple[float, float]:
    """Median wall and CPU seconds of forward + backward over `iterations` (after one untimed call)."""
    fn(x).backward(grad)
    walls, cpus = [], []
    for _ in range(iterations):
        wall, cpu = time.perf_counter(), time.process_time()
        fn(x).backward(grad)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One record per (threads, round, load, config)."""
    import torch

    configs = layers(args)
    x = torch.randn(1, args.tokens, args.in_features, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.out_features)
    records = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for round_index in range(args.rounds):
            loads = LOADS if round_index % 2 == 0 else tuple(reversed(LOADS))
            for load in loads:
                names = CONFIGS if round_index % 2 == 0 else tuple(reversed(CONFIGS))
                with busy_core(args.busy_core if load == "busy" else None):
                    for name in names:
                        wall, cpu = time_config(configs[name], x, grad, args.iterations)
                        records.append(
                            {"threads": threads, "round": round_index, "load": load, "config": name,
                             "ms": wall * 1e3, "cpu_ms": cpu * 1e3}
                        )  # fmt: skip
                print(
                    threads, round_index, load, [f"{r['ms']:.1f}" for r in records[-len(names) :]], flush=True
                )
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (threads, load, config): median ms over rounds, per-round ratios to fp32 and busy/quiet."""

    def value(threads: int, rnd: int, load: str, config: str) -> float:
        return next(
            r["ms"]
            for r in records
            if (r["threads"], r["round"], r["load"], r["config"]) == (threads, rnd, load, config)
        )

    rows = []
    for threads in sorted({r["threads"] for r in records}):
        rounds = sorted({r["round"] for r in records if r["threads"] == threads})
        for load in LOADS:
            for config in CONFIGS:
                ms = [value(threads, k, load, config) for k in rounds]
                cpu = [
                    r["cpu_ms"]
                    for r in records
                    if (r["threads"], r["load"], r["config"]) == (threads, load, config)
                ]
                vs_fp32 = [value(threads, k, load, config) / value(threads, k, load, "fp32") for k in rounds]
                row: dict[str, Any] = {
                    "threads": threads,
                    "load": load,
                    "config": config,
                    "ms": statistics.median(ms),
                    "ms_all": ms,
                    "cpu_ms": statistics.median(cpu),
                    "vs_fp32": statistics.median(vs_fp32),
                    "vs_fp32_range": [min(vs_fp32), max(vs_fp32)],
                }
                if load == "busy":
                    slow = [
                        value(threads, k, "busy", config) / value(threads, k, "quiet", config) for k in rounds
                    ]
                    fp32_slow = [
                        value(threads, k, "busy", "fp32") / value(threads, k, "quiet", "fp32") for k in rounds
                    ]
                    row["slowdown"] = statistics.median(slow)
                    row["slowdown_vs_fp32"] = statistics.median(
                        [a / b for a, b in zip(slow, fp32_slow, strict=True)]
                    )
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        {
            "layer": row["config"],
            "threads": row["threads"],
            "load": row["load"],
            "ms (median)": row["ms"],
            "/ fp32 (median)": row["vs_fp32"],
            "/ fp32 range": "{:.2f}-{:.2f}".format(*row["vs_fp32_range"]),
            "busy / quiet": row.get("slowdown"),
            "slowdown / fp32's": row.get("slowdown_vs_fp32"),
            "CPU ms": row["cpu_ms"],
            "ms, each round": ", ".join(f"{v:.1f}" for v in row["ms_all"]),
        }
        for row in rows
    ]
    formats = {
        "ms (median)": ".1f",
        "/ fp32 (median)": ".2f",
        "busy / quiet": ".2f",
        "slowdown / fp32's": ".2f",
        "CPU ms": ".1f",
    }
    return markdown_table(lines, list(lines[0]), formats) if lines else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, threads_default=[1, 2], threads_nargs="+")
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=5, help="timed calls per configuration and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--busy-core", type=int, default=None, help="default: the highest-numbered core")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args(argv)
    if args.busy_core is None:
        args.busy_core = default_core()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    records = measure(args)
    rows = summarize(records)
    info = machine_info()
    from lightning_qlora.quantization.backends import linear4bit_op

    header = (
        f"# One 4-bit layer, {args.out_features} x {args.in_features}, {args.tokens} tokens: forward + input "
        "gradient\n\n"
        f"NF4 + double quant, fp32 compute, dequantization loop {linear4bit_op.simd_level()}. "
        f"{args.rounds} rounds, each timing every configuration quiet and beside a process spinning on core "
        f"{args.busy_core} ({args.iterations} calls each, the median); ratios are paired within a round. "
        f"{info['cpu_count']} CPU cores, torch {info['torch']}; load average at the end {info.get('loadavg')}"
        " (other programs ran on this machine: compare ratios, not milliseconds).\n\n"
    )
    payload = {
        "benchmark": NAME,
        "config": {
            k: getattr(args, k)
            for k in ("in_features", "out_features", "tokens", "iterations", "rounds", "threads", "busy_core")
        },
        "machine": info,
        "results": rows,
        "records": records,
        "runtime_s": time.perf_counter() - started,
    }
    markdown = header + table(rows)
    write_results(args.out, args.name, payload, markdown)
    report_written(args.out, args.name, markdown, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
