"""One 4-bit layer's forward + input gradient at 1 and all threads, quiet and beside a busy core.

Why: a profile of where QLoRA's loss to 32-bit LoRA at two threads went, small enough to repeat many times.
Three ways to compute ``x @ W.T`` and ``grad @ W`` for one frozen weight (Llama 0.5B's MLP shape by default,
4096 x 1024, 256 tokens), each in a fresh process: ``fp32`` (an ``nn.Linear`` holding the weight, what
LoRA's base does), ``op`` (the package's 4-bit layer through the native operator) and ``python_loop`` (the
same layer with ``LIGHTNING_QLORA_DISABLE_LINEAR_OP=1``: the Python band loop around the ctypes kernel that
starts POSIX threads on every call). Also timed: one token through the whole weight (dequantization plus a
one-row matmul), by the ctypes kernel (its own threads) and by the operator (torch's threads), right after
a matmul, when torch's OpenMP workers are still spinning. Runs are interleaved; the median of each
process's iterations, the best and the spread over repeats are reported, with ratios to ``fp32``.

Run: ``python -m benchmarks.linear4bit_threads [--threads 1 2] [--load quiet busy] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from benchmarks.busy_core import LOADS, busy_core, default_core
from benchmarks.harness import (
    base_parser,
    interleaved,
    machine_info,
    markdown_table,
    report_written,
    run_worker,
    set_threads,
    write_results,
    write_worker_result,
)

NAME = "linear4bit_threads"
CONFIGS = ("fp32", "op", "python_loop")
CONFIG_ENV = {"python_loop": {"LIGHTNING_QLORA_DISABLE_LINEAR_OP": "1"}}


def worker_main(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from lightning_qlora.quantization import QuantizationConfig
    from lightning_qlora.quantization.backends import bitsandbytes as bnb_backend
    from lightning_qlora.quantization.backends import cpu_kernel, linear4bit_op
    from lightning_qlora.quantization.layers import quantize_layer, to_linear4bit

    set_threads(args.threads[0])
    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out_features, bias=False)
    if args.worker == "fp32":
        layer: nn.Module = linear.requires_grad_(False)
    else:
        layer = to_linear4bit(linear, QuantizationConfig(), torch.float32)
        quantize_layer(layer)
    x = torch.randn(1, args.tokens, args.in_features, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.out_features)

    def step() -> None:
        layer(x).backward(grad)

    extra: dict[str, Any] = {}
    if args.worker == "op":
        extra = dequantize_alone(layer, args, bnb_backend, cpu_kernel, linear4bit_op)
    times = time_it(step, args.iterations)
    result = {"ok": True, "config": args.worker, "ms": statistics.median(times) * 1e3, **extra}
    write_worker_result(args.result, result)
    return 0


def time_it(fn: Any, iterations: int, before: Any = None) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iterations):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def dequantize_alone(
    layer: Any, args: argparse.Namespace, bnb_backend: Any, cpu_kernel: Any, op: Any
) -> dict[str, Any]:
    """One token through the whole weight right after a matmul: the ctypes kernel's dequantization (its own
    threads) then the one-row matmul, against the operator doing the same on torch's threads."""
    import torch

    packed = bnb_backend._packed_weight(layer)
    out = torch.empty(args.out_features, args.in_features)
    one = torch.randn(1, args.in_features)
    a, b = torch.randn(args.tokens, args.in_features), torch.randn(args.in_features, args.in_features)
    matmul = lambda: torch.mm(a, b)  # noqa: E731 - leaves torch's OpenMP workers spinning

    def ctypes_kernel() -> None:
        cpu_kernel.dequantize_4bit_into(
            packed.packed, packed.code, packed.absmax, packed.blocksize, out,
            nested_code=packed.nested_code, nested_absmax=packed.nested_absmax,
            nested_blocksize=packed.nested_blocksize, offset=float(packed.offset),
        )  # fmt: skip
        torch.mm(one, out.t())

    result = {"one_token_ctypes_ms": statistics.median(time_it(ctypes_kernel, args.iterations, matmul)) * 1e3}
    if op.available():
        whole = args.out_features  # one band: the whole weight, as the ctypes call above
        time_op = time_it(lambda: op.linear4bit(one, packed, None, whole), args.iterations, matmul)
        result["one_token_op_ms"] = statistics.median(time_op) * 1e3
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, threads_default=[1, 2], threads_nargs="+")
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", nargs="+", choices=LOADS, default=list(LOADS))
    parser.add_argument("--busy-core", type=int, default=None)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.busy_core is None:
        args.busy_core = default_core()
    return args


def worker_cmd(args: argparse.Namespace, name: str, threads: int) -> list[str]:
    return [
        "--worker", name, "--threads", str(threads), "--in-features", str(args.in_features),
        "--out-features", str(args.out_features), "--tokens", str(args.tokens),
        "--iterations", str(args.iterations),
    ]  # fmt: skip


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for key, results in runs.items():
        name, threads, load = key.split("@")
        ok = [r for r in results if r.get("ok")]
        row: dict[str, Any] = {"config": name, "threads": int(threads), "load": load}
        if not ok:
            rows.append({**row, "error": results[0].get("error") if results else "not run"})
            continue
        for metric in ("ms", "one_token_ctypes_ms", "one_token_op_ms"):
            values = [r[metric] for r in ok if metric in r]
            if values:
                row[metric] = min(values)
                row[f"{metric}_all"] = values
        rows.append(row)
    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if r["config"] == "fp32" and r["threads"] == row["threads"] and r["load"] == row["load"]
            ),
            None,
        )
        if ref is not None and "ms" in ref and "ms" in row:
            row["vs_fp32"] = row["ms"] / ref["ms"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in sorted(rows, key=lambda r: (r["threads"], r["load"] != "quiet", CONFIGS.index(r["config"]))):
        spread = ", ".join(f"{v:.1f}" for v in row.get("ms_all", []))
        lines.append(
            {
                "layer": row["config"],
                "threads": row["threads"],
                "load": row["load"],
                "fwd + input grad ms": row.get("ms"),
                "/ fp32": row.get("vs_fp32"),
                "each repeat": spread or row.get("error"),
                "1 token, ctypes kernel ms": row.get("one_token_ctypes_ms"),
                "1 token, operator ms": row.get("one_token_op_ms"),
            }
        )
    formats = {
        "fwd + input grad ms": ".1f",
        "/ fp32": ".2f",
        "1 token, ctypes kernel ms": ".2f",
        "1 token, operator ms": ".2f",
    }
    return markdown_table(lines, list(lines[0]), formats) if lines else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    for threads in args.threads:
        for round_index, name in interleaved(args.configs, args.repeats):
            for load in args.load if round_index % 2 == 0 else list(reversed(args.load)):
                with busy_core(args.busy_core if load == "busy" else None):
                    result = run_worker(
                        __spec__.name, worker_cmd(args, name, threads), 600, CONFIG_ENV.get(name)
                    )
                runs.setdefault(f"{name}@{threads}@{load}", []).append(result)
                print(
                    threads, load, name, {k: v for k, v in result.items() if k.endswith("ms") or k == "error"}
                )
    rows = aggregate(runs)
    info = machine_info()
    header = (
        f"# One 4-bit layer, {args.out_features} x {args.in_features}, {args.tokens} tokens: forward + input "
        "gradient\n\n"
        f"fp32 compute; {args.iterations} iterations per process, the median; best of {args.repeats} "
        "interleaved processes, each repeat listed. "
        f"Busy: beside a process spinning on core {args.busy_core}. "
        "1 token: one row through the whole weight right after a matmul (dequantization and a one-row "
        f"matmul), ctypes kernel vs operator, in the op worker. {info['cpu_count']} CPU cores, torch "
        f"{info['torch']}; load average at the end {info.get('loadavg')}.\n\n"
    )
    payload = {
        "benchmark": NAME,
        "config": {
            k: getattr(args, k)
            for k in (
                "in_features",
                "out_features",
                "tokens",
                "iterations",
                "repeats",
                "threads",
                "load",
                "busy_core",
            )
        },
        "machine": info,
        "results": rows,
        "runs": runs,
        "runtime_s": time.perf_counter() - started,
    }
    markdown = header + table(rows)
    write_results(args.out, args.name, payload, markdown)
    report_written(args.out, args.name, markdown, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
