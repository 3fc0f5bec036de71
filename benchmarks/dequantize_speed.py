"""How close to memory speed does 4-bit dequantization run on CPU? GB/s written, side by side.

For NF4 + double-quantized weights (blocksize 64, second level 256) of Llama shapes, each method writes the
dequantized weight (float32 or bfloat16) and is timed per call, interleaved (every other round reversed),
after one warm-up call each:

- ``ours``: `lightning_qlora.quantization.backends.cpu_kernel.dequantize_4bit_into` into a reused buffer
  (the second-level absmax decoded per block, inside the kernel);
- ``bnb public``: `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`, the public function the
  layers call today (a fresh output each call, the absmax decoded into a temporary first);
- ``bnb C, reused``: bitsandbytes' own CPU C kernel (``lib.cdequantize_blockwise_cpu_nf4_*``) writing into
  a reused buffer, after decoding the absmax with `dequantize_blockwise` (timed together, as a caller would
  have to); its OpenMP thread count is set to the measured one;
- ``torch copy_``: ``buf.copy_(src)`` of the same number of bytes into a reused buffer: reads as much as it
  writes, the practical memory-speed limit for a kernel that writes this much;
- ``torch fill_``: ``buf.fill_(x)``, writes only.

GB/s = bytes written / seconds. The table gives the median and the spread (min-max) of ``repeats`` calls
and ratios of medians; ``ours`` output is checked bit for bit against ``bnb public`` once per row. It also
gives the CPU time per call (all threads of the process): on a shared, oversubscribed machine the wall time
includes waiting for a core, and the CPU time at one thread is the steadier comparison.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.harness import (
    base_parser,
    interleaved,
    machine_info,
    markdown_table,
    report_written,
    write_results,
)

NAME = "dequantize_speed"
BLOCKSIZE = 64
METHODS = ("ours", "bnb public", "bnb C, reused", "torch copy_", "torch fill_")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = base_parser(__doc__, threads_default=[1, 2], threads_nargs="+")
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="ROWSxCOLS")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per method (>= 10 advised)")
    return parser.parse_args(argv)


def _set_omp_threads(threads: int) -> bool:
    """bitsandbytes' C kernels use the system OpenMP runtime, which torch.set_num_threads does not reach."""
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(threads)
    except (OSError, AttributeError):
        return False
    return True


def _methods(shape: tuple[int, int], dtype: torch.dtype) -> tuple[dict[str, Callable[[], object]], bool]:
    """The callables to time for one weight, and whether ours is bit-identical to bitsandbytes' output."""
    import bitsandbytes.functional as bnbf

    from lightning_qlora.quantization.backends import cpu_kernel

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True
    )
    del weight
    state.dtype = dtype
    nested = state.state2
    flat = packed.view(-1)
    offset = float(state.offset)
    ours_out = torch.empty(shape, dtype=dtype)
    bnb_out = torch.empty(shape, dtype=dtype)
    copy_out = torch.empty(shape, dtype=dtype)
    copy_src = torch.full(shape, 0.25, dtype=dtype)

    def ours() -> object:
        return cpu_kernel.dequantize_4bit_into(
            flat,
            state.code,
            state.absmax,
            BLOCKSIZE,
            ours_out,
            nested.code,
            nested.absmax,
            nested.blocksize,
            offset,
        )

    methods: dict[str, Callable[[], object]] = {
        "ours": ours,
        "bnb public": lambda: bnbf.dequantize_4bit(packed, state),
        "torch copy_": lambda: copy_out.copy_(copy_src),
        "torch fill_": lambda: copy_out.fill_(0.5),
    }
    try:
        from bitsandbytes.cextension import lib

        c_kernel = getattr(
            lib, f"cdequantize_blockwise_cpu_nf4_{'fp32' if dtype == torch.float32 else 'bf16'}"
        )
        rows, cols = shape

        def bnb_c() -> object:
            absmax = bnbf.dequantize_blockwise(state.absmax, nested)
            absmax += state.offset
            c_kernel(
                ctypes.c_void_p(flat.data_ptr()),
                ctypes.c_void_p(absmax.data_ptr()),
                ctypes.c_void_p(bnb_out.data_ptr()),
                ctypes.c_longlong(BLOCKSIZE),
                ctypes.c_longlong(rows),
                ctypes.c_longlong(cols),
            )
            return bnb_out

        methods["bnb C, reused"] = bnb_c
    except (ImportError, AttributeError) as err:
        print(f"bitsandbytes' C kernel is not reachable: {err}")
    ours()
    reference = bnbf.dequantize_4bit(packed, state)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    identical = torch.equal(ours_out.view(bits), reference.view(bits))
    return methods, identical


def measure(
    shape: tuple[int, int], dtype_name: str, threads: int, repeats: int
) -> tuple[list[dict[str, Any]], bool]:
    dtype = DTYPES[dtype_name]
    torch.set_num_threads(threads)
    omp_set = _set_omp_threads(threads)
    methods, identical = _methods(shape, dtype)
    for call in methods.values():  # warm-up: first touch of reused buffers, lazy init
        call()
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    for _, name in interleaved(list(methods), repeats):
        cpu_start = time.process_time()
        start = time.perf_counter()
        methods[name]()
        times[name].append(time.perf_counter() - start)
        cpu_times[name].append(time.process_time() - cpu_start)
    written = shape[0] * shape[1] * (4 if dtype == torch.float32 else 2)
    rows = []
    for name in METHODS:
        if name not in times:
            continue
        rates = [written / t / 1e9 for t in times[name]]
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "out": dtype_name,
                "threads": threads,
                "method": name,
                "ms_median": statistics.median(times[name]) * 1e3,
                "cpu_ms_median": statistics.median(cpu_times[name]) * 1e3,
                "GB/s_median": statistics.median(rates),
                "GB/s_min": min(rates),
                "GB/s_max": max(rates),
                "MiB_written": written / 2**20,
                "omp_threads_set": omp_set if name == "bnb C, reused" else None,
            }
        )
    by_name = {row["method"]: row for row in rows}
    for row in rows:
        for ref, key in (("torch copy_", "x_copy"), ("bnb public", "x_bnb_public")):
            if ref in by_name:
                row[key] = row["GB/s_median"] / by_name[ref]["GB/s_median"]
    return rows, identical


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from lightning_qlora.quantization.backends import cpu_kernel

    if not cpu_kernel.kernel_available():
        print("the native kernel is unavailable here; nothing to compare")
        return 2
    started = time.perf_counter()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    results: list[dict[str, Any]] = []
    identical: dict[str, bool] = {}
    for shape in shapes:
        for dtype_name in args.dtypes:
            for threads in args.threads:
                rows, same = measure(shape, dtype_name, threads, args.repeats)  # type: ignore[arg-type]
                identical[f"{shape[0]}x{shape[1]} {dtype_name}"] = same
                results.extend(rows)
                print(
                    f"{shape} {dtype_name} threads={threads}: "
                    + ", ".join(f"{r['method']} {r['GB/s_median']:.2f} GB/s" for r in rows),
                    flush=True,
                )
    info = machine_info()
    kernel = cpu_kernel.kernel_info()
    if kernel is not None:  # the file name (a hash of source, compiler, flags, CPU), not this machine's path
        kernel["path"] = os.path.basename(str(kernel["path"]))
    columns = [
        "shape",
        "out",
        "threads",
        "method",
        "ms_median",
        "cpu_ms_median",
        "GB/s_median",
        "GB/s_min",
        "GB/s_max",
        "x_copy",
        "x_bnb_public",
    ]
    table = markdown_table(results, columns, formats={"x_copy": ".2f", "x_bnb_public": ".2f"})
    load = " / ".join(f"{v:.1f}" for v in info["loadavg"]) if info.get("loadavg") else "-"
    header = (
        "# CPU 4-bit dequantization speed (NF4 + double quant, blocksize 64)\n\n"
        f"torch {info['torch']}, bitsandbytes {info['bitsandbytes']}, {info['cpu_count']} CPU cores "
        f"({info.get('processor') or info['machine']}), load average {load}; kernel: "
        f"{kernel['simd'] if kernel else '-'}. GB/s = bytes written / wall time, median (min-max) of "
        f"{args.repeats} interleaved calls; cpu_ms: CPU time of the process per call (steadier than the "
        "wall time on a busy machine); x_copy and x_bnb_public are ratios of median GB/s. `ours` "
        f"bit-identical to `bnb public`: {'yes' if all(identical.values()) else 'NO: ' + str(identical)}. "
        "The machine is shared and was busy: treat the absolute figures as noisy, the ratios within a "
        "row group as the result.\n\n"
    )
    payload = {
        "benchmark": NAME,
        "description": "GB/s written by 4-bit dequantization on CPU, ours vs bitsandbytes vs a torch copy.",
        "config": {
            "shapes": args.shapes,
            "dtypes": args.dtypes,
            "threads": args.threads,
            "repeats": args.repeats,
            "blocksize": BLOCKSIZE,
            "quant_type": "nf4",
            "double_quant": True,
            "timing": "per call, interleaved, one warm-up call each; median and min-max",
        },
        "machine": info,
        "kernel": kernel,
        "bit_identical_to_bnb_public": identical,
        "results": results,
        "runtime_s": time.perf_counter() - started,
    }
    write_results(args.out, NAME, payload, header + table)
    report_written(args.out, NAME, header + table, payload["runtime_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
