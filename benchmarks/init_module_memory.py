"""Peak memory of building a model for QLoRA: in full precision then quantized, or under `init_module()`.

Why: `QLoRAPrecision` quantizes at setup, so a model built the ordinary way exists once in full precision.
Under `trainer.init_module()` the plugin builds it straight into 4 bits, each linear layer quantized as it
is attached to its parent (and again after transformers' `post_init` re-initialises it), so the peak should
be the 4-bit model plus one layer. Each path runs in a fresh subprocess, interleaved over rounds:

- ``build_then_quantize``: ``LlamaForCausalLM(config)``, then ``replace_linear_layers`` (what setup does);
- ``build_then_quantize_lean``: the same inside ``lean_cpu_memory()``, the CPU heap limit that
  ``init_module`` applies while it builds (``limit_cpu_heap``), to tell its share of the difference;
- ``init_module``: ``with trainer.init_module(): LlamaForCausalLM(config)`` with a ``QLoRAPrecision`` Trainer.

Both are seeded alike, and the script checks that they produce the same packed 4-bit bytes (a SHA-256 over
every 4-bit layer's tensors). Peak memory is the worker's ``VmHWM`` from ``/proc/self/status``, reset with
``/proc/self/clear_refs`` after the imports, the Trainer and a tiny warm-up; growth = peak - VmRSS at reset.

Run: ``python -m benchmarks.init_module_memory [--layers 12] [--repeats 3] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import sys
import time
from typing import Any

from benchmarks.harness import (
    add_worker_options,
    base_parser,
    interleaved,
    library_warm_up,
    llama_config_kwargs,
    llama_param_count,
    machine_info,
    markdown_table,
    mib,
    proc_status_kib,
    report_written,
    reset_peak_rss,
    run_worker,
    set_threads,
    write_results,
    write_worker_result,
)

NAME = "init_module_memory"
PATHS = ("build_then_quantize", "build_then_quantize_lean", "init_module")
REFERENCE = "build_then_quantize"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the paths alternate within each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--name", default=NAME, help="results file stem")
    add_worker_options(parser)
    return parser.parse_args(argv)


def worker_main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    import lightning.pytorch as pl
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_qlora import QLoRAPrecision
    from lightning_qlora.quantization import is_linear4bit, replace_linear_layers
    from lightning_qlora.quantization.cpu_allocator import lean_cpu_memory
    from lightning_qlora.quantization.layers import quantized_weight_state

    config = LlamaConfig(**llama_config_kwargs(args.hidden, args.layers, args.intermediate, args.vocab))
    plugin = QLoRAPrecision(compute_dtype="float32", log_report=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    library_warm_up(torch.float32)
    gc.collect()
    reset_peak_rss()
    base = proc_status_kib("VmRSS")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.worker == "init_module":
        with trainer.init_module():
            model = LlamaForCausalLM(config)
    else:
        with lean_cpu_memory(args.worker == "build_then_quantize_lean"):
            model = LlamaForCausalLM(config)
            replace_linear_layers(model, plugin.config, compute_dtype=torch.float32)
    seconds = time.perf_counter() - started
    peak, rss = proc_status_kib("VmHWM"), proc_status_kib("VmRSS")
    digest = hashlib.sha256()
    layers = [(name, m) for name, m in model.named_modules() if is_linear4bit(m)]
    for _, layer in layers:
        for key, tensor in sorted(quantized_weight_state(layer).items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    write_worker_result(
        args.result,
        {
            "ok": True,
            "path": args.worker,
            "peak_rss_mib": mib(peak),
            "base_rss_mib": mib(base),
            "growth_mib": mib(peak - base) if peak is not None and base is not None else None,
            "rss_after_mib": mib(rss),
            "build_s": seconds,
            "four_bit_layers": len(layers),
            "sha256": digest.hexdigest(),
        },
    )
    return 0


def run_paths(args: argparse.Namespace) -> list[dict[str, Any]]:
    shared = [
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--intermediate",
        str(args.intermediate),
        "--vocab",
        str(args.vocab),
        "--seed",
        str(args.seed),
    ]
    if args.threads:
        shared += ["--threads", str(args.threads)]
    runs = []
    for round_index, path in interleaved(PATHS, args.repeats):
        print(f"round {round_index + 1}/{args.repeats}: {path}", flush=True)
        result = run_worker(f"benchmarks.{NAME}", ["--worker", path, *shared], args.timeout)
        runs.append({"round": round_index, "path": path, **result})
    return runs


def aggregate(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per path: growth median and spread; per round: each path's growth / build_then_quantize's."""
    rows = []
    for path in PATHS:
        ok = [r for r in runs if r["path"] == path and r.get("ok")]
        if not ok:
            rows.append(
                {"path": path, "error": next((r.get("error") for r in runs if r["path"] == path), "")}
            )
            continue
        growth = [r["growth_mib"] for r in ok]
        rows.append(
            {
                "path": path,
                "runs": len(ok),
                "growth_mib_median": statistics.median(growth),
                "growth_mib_min": min(growth),
                "growth_mib_max": max(growth),
                "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in ok),
                "rss_after_mib_median": statistics.median(r["rss_after_mib"] for r in ok),
                "build_s_median": statistics.median(r["build_s"] for r in ok),
                "four_bit_layers": ok[0]["four_bit_layers"],
            }
        )
    ratios: dict[str, list[float]] = {path: [] for path in PATHS if path != REFERENCE}
    for round_index in sorted({r["round"] for r in runs}):
        done = {r["path"]: r for r in runs if r["round"] == round_index and r.get("ok")}
        for path in ratios:
            if path in done and REFERENCE in done:
                ratios[path].append(done[path]["growth_mib"] / done[REFERENCE]["growth_mib"])
    digests = {r["sha256"] for r in runs if r.get("ok")}
    summary = {
        "growth_ratio_per_round": ratios,
        "growth_ratio_median": {p: statistics.median(v) if v else None for p, v in ratios.items()},
        "same_4bit_bytes": len(digests) == 1,
    }
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    started = time.perf_counter()
    runs = run_paths(args)
    rows, summary = aggregate(runs)
    config_kwargs = llama_config_kwargs(args.hidden, args.layers, args.intermediate, args.vocab)
    params = llama_param_count(config_kwargs)
    info = {**machine_info(), "device": "cpu"}
    payload = {
        "benchmark": NAME,
        "description": "Peak RSS growth of building a random Llama for QLoRA (NF4 + DQ, lm_head kept): in "
        "full precision then quantized, or under trainer.init_module() with QLoRAPrecision.",
        "config": {
            "model": {"type": "LlamaForCausalLM", **config_kwargs, "params": params},
            "quantization": {
                "quant_type": "nf4",
                "blocksize": 64,
                "double_quant": True,
                "exclude": ["lm_head"],
            },
            "threads": args.threads,
            "repeats": args.repeats,
            "seed": args.seed,
            "peak_memory": "VmHWM of a fresh worker, reset via /proc/self/clear_refs after imports, the "
            "Trainer and a tiny warm-up; growth = peak - VmRSS at the reset",
        },
        "machine": info,
        "summary": summary,
        "results": rows,
        "runs": runs,
        "runtime_s": time.perf_counter() - started,
    }
    ratio_lines = "".join(
        f"- {path} / {REFERENCE}: {', '.join(f'{r:.2f}x' for r in per_round)} (median "
        f"{'n/a' if not per_round else f'{statistics.median(per_round):.2f}x'})\n"
        for path, per_round in summary["growth_ratio_per_round"].items()
    )
    table = (
        f"# Building a {params / 1e6:.0f}M-parameter Llama for QLoRA: peak memory\n\n"
        f"hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab} "
        f"(untied LM head, kept in full precision); NF4 + DQ, blocksize 64; random init (transformers' "
        f"`post_init`), seed {args.seed}; {args.repeats} rounds, paths alternating, each a fresh process; "
        f"CPU, {args.threads} thread(s); load average at the end {info.get('loadavg')}.\n\n"
        + markdown_table(
            rows,
            [
                "path",
                "runs",
                "growth_mib_median",
                "growth_mib_min",
                "growth_mib_max",
                "peak_rss_mib_median",
                "rss_after_mib_median",
                "build_s_median",
                "four_bit_layers",
            ],
            {
                c: ".0f"
                for c in (
                    "growth_mib_median",
                    "growth_mib_min",
                    "growth_mib_max",
                    "peak_rss_mib_median",
                    "rss_after_mib_median",
                )
            }
            | {"build_s_median": ".1f"},
        )
        + "\nPeak growth, per round (rounds alternate the order of the paths):\n\n"
        + ratio_lines
        + f"\nSame packed 4-bit bytes on every path: {summary['same_4bit_bytes']}. The machine was shared "
        "with other work (load average above).\n"
    )
    write_results(args.out, args.name, payload, table)
    report_written(args.out, args.name, table, payload["runtime_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
