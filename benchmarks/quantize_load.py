"""Getting a 4-bit model into memory: quantize time, storage, and peak memory of three loading paths.

Why: QLoRA's promise is a model that never has to fit in memory in full precision. That holds only if the
weights are quantized as they are read. This script saves a randomly initialised Llama-style causal LM
(a few hundred million parameters, built from a ``transformers.LlamaConfig``) once as safetensors, then
loads it three ways, each in a fresh subprocess:

- ``full_then_convert``: ``from_pretrained`` in full precision, then ``replace_linear_layers`` (reference);
- ``load_quantized``: the model built on the meta device, weights streamed from the safetensors file and
  each linear weight quantized as it arrives (``lightning_qlora.load_quantized``);
- ``transformers_bnb``: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant))``.

Peak memory is the subprocess's own peak resident set (``VmHWM`` in ``/proc/self/status``), reset with
``/proc/self/clear_refs`` after the imports; ``resource.getrusage().ru_maxrss`` cannot be used, because
Linux carries the forking parent's peak over ``exec``. Every path also runs one forward pass afterwards,
so the script checks that all paths built the same quantized model (logits compared bit for bit).

Run: ``python -m benchmarks.quantize_load [--layers 24] [--repeats 2] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    MIB,
    AnonPeakSampler,
    add_worker_options,
    base_parser,
    build_on_meta,
    check_input_ids,
    describe_exception,
    interleaved,
    library_warm_up,
    llama_config_kwargs,
    machine_info,
    markdown_table,
    mib,
    model_folder,
    proc_status_kib,
    report_written,
    reset_peak_rss,
    run_worker,
    save_random_model,
    set_threads,
    torch_dtype,
    write_results,
    write_worker_result,
)

NAME = "quantize_load"
PATHS = ("full_then_convert", "load_quantized", "transformers_bnb")
REFERENCE = "full_then_convert"
PATH_LABELS = {
    "full_then_convert": "full precision, then replace_linear_layers",
    "load_quantized": "load_quantized (meta model, streamed)",
    "transformers_bnb": "transformers from_pretrained + BitsAndBytesConfig",
}
DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------------
# Worker: one loading path in this process.
# --------------------------------------------------------------------------------------------------------


def load_path(path: str, model_dir: Path, args: argparse.Namespace, timings: dict[str, float]) -> Any:
    """Load the saved model by `path`; fills `timings` with the phases it can tell apart."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from lightning_qlora import load_quantized
    from lightning_qlora.quantization import QuantizationConfig, replace_linear_layers

    dtype = torch_dtype(args.load_dtype or args.dtype)
    compute_dtype = torch_dtype(args.compute_dtype)
    qconfig = QuantizationConfig(
        quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=compute_dtype
    )
    start = time.perf_counter()
    if path == "full_then_convert":
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        timings["load_s"] = time.perf_counter() - start
        mid = time.perf_counter()
        replace_linear_layers(model, qconfig, compute_dtype=compute_dtype)
        timings["quantize_s"] = time.perf_counter() - mid
    elif path == "load_quantized":
        config = LlamaConfig.from_pretrained(model_dir)
        model = build_on_meta(config)
        load_quantized(model, model_dir, qconfig, compute_dtype=compute_dtype, dtype=dtype)
    elif path == "transformers_bnb":
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        model = LlamaForCausalLM.from_pretrained(
            model_dir, quantization_config=bnb_config, dtype=dtype, device_map="cpu"
        )
    else:
        raise ValueError(f"unknown path {path!r}")
    timings["total_s"] = time.perf_counter() - start
    return model


def worker_main(args: argparse.Namespace) -> int:
    """Measure one path; write a JSON result (or the reason it failed) to ``args.result``."""
    result_path = Path(args.result)
    import torch

    set_threads(args.threads)
    if args.worker == "save":
        config_kwargs = json.loads(args.config_json)
        info = save_random_model(config_kwargs, args.dtype, args.seed, Path(args.model_dir))
        write_worker_result(result_path, {"ok": True, **info})
        return 0

    # The same imports in every path, so each starts from the same resident baseline.
    import bitsandbytes  # noqa: F401
    import transformers  # noqa: F401
    from transformers.integrations import bitsandbytes as _hf_bnb  # noqa: F401

    from lightning_qlora import quantization_report
    from lightning_qlora._memory import release_freed_memory
    from lightning_qlora.quantization.cpu_caching_allocator import release_cached

    library_warm_up(torch_dtype(args.compute_dtype))
    gc.collect()
    release_cached()
    release_freed_memory()
    model_dir = Path(args.model_dir)
    reset_ok = reset_peak_rss()
    base_kib = proc_status_kib("VmRSS")
    base_anon_kib = proc_status_kib("RssAnon")
    timings: dict[str, float] = {}
    try:
        with AnonPeakSampler() as sampler:
            model = load_path(args.worker, model_dir, args, timings)
    except Exception as err:  # a refusal (e.g. no CPU support) is a result to record, not a crash
        write_worker_result(result_path, {"ok": False, "error": describe_exception(err)})
        return 0
    peak_kib = proc_status_kib("VmHWM")
    gc.collect()
    after = {field: proc_status_kib(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    report = quantization_report(model)
    weights_sha = quantized_weights_digest(model)

    # Training mode (this config has no dropout): bitsandbytes repacks 4-bit weights for a bf16 inference
    # kernel on AVX512-BF16 CPUs in eval mode, which would make the paths differ for a reason unrelated
    # to loading. The package turns that repacking off; transformers' layers keep it.
    model.train()
    with torch.no_grad():
        logits = model(check_input_ids(model.config.vocab_size)).logits.float()
    after_forward_kib = proc_status_kib("VmRSS")
    reference = torch.load(model_dir / "reference_logits.pt", weights_only=True)
    torch.save(logits, result_path.with_suffix(".logits.pt"))
    result = {
        "ok": True,
        "path": args.worker,
        **timings,
        "peak_reset": reset_ok,
        "rss_before_mib": mib(base_kib),
        "peak_rss_mib": mib(peak_kib),
        "peak_growth_mib": mib(peak_kib - base_kib)
        if peak_kib is not None and base_kib is not None
        else None,
        "peak_anon_sampled_mib": mib(sampler.peak_anon_kib),
        "peak_anon_growth_mib": mib(sampler.peak_anon_kib - base_anon_kib)
        if base_anon_kib is not None
        else None,
        "peak_file_sampled_mib": mib(sampler.peak_file_kib),
        "rss_after_mib": mib(after["VmRSS"]),
        "rss_anon_after_mib": mib(after["RssAnon"]),
        "rss_file_after_mib": mib(after["RssFile"]),
        "rss_after_forward_mib": mib(after_forward_kib),
        "report": report.as_dict(),
        "logits_max_abs_diff_vs_full_precision": float((logits - reference).abs().max()),
        "logits_rel_error_vs_full_precision": float((logits - reference).norm() / reference.norm()),
        "logits_sha": _tensor_digest(logits),
        "quantized_weights_sha": weights_sha,
    }
    write_worker_result(result_path, result)
    return 0


def _tensor_digest(tensor: Any) -> str:
    import hashlib

    return hashlib.sha256(
        tensor.detach().contiguous().view(-1).view(torch_dtype("uint8")).numpy()
    ).hexdigest()[:16]


def quantized_weights_digest(model: Any) -> str:
    """A hash over every 4-bit layer's packed codes and (nested) absmax constants, in module order."""
    import hashlib

    from lightning_qlora.quantization import is_quantized

    digest = hashlib.sha256()
    for module in model.modules():
        if not is_quantized(module):
            continue
        state = module.weight.quant_state
        parts = [module.weight.data, state.absmax]
        if state.nested:
            parts += [state.state2.absmax, state.offset.reshape(1)]
        for part in parts:
            digest.update(_tensor_digest(part).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Parent: save once, run the paths interleaved, aggregate, write tables.
# --------------------------------------------------------------------------------------------------------


def aggregate(runs: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per path: best (minimum) time over repeats, highest peak; ratios to the full-precision path."""
    rows: list[dict[str, Any]] = []
    for path, results in runs.items():
        ok = [r for r in results if r.get("ok")]
        if not ok:
            rows.append({"path": path, "error": results[0].get("error", "failed") if results else "not run"})
            continue
        row: dict[str, Any] = {"path": path, "repeats": len(ok)}
        for key in ("load_s", "quantize_s", "total_s"):
            values = [r[key] for r in ok if key in r]
            row[key] = min(values) if values else None
            if key == "total_s":
                row["total_s_all"] = [r[key] for r in ok]
        for key in (
            "peak_rss_mib",
            "peak_growth_mib",
            "rss_before_mib",
            "rss_after_mib",
            "peak_anon_growth_mib",
            "peak_file_sampled_mib",
            "rss_anon_after_mib",
            "rss_file_after_mib",
            "rss_after_forward_mib",
        ):
            values = [r[key] for r in ok if r.get(key) is not None]
            row[key] = max(values) if values else None
        report = ok[0]["report"]
        row["param_mib"] = report["total_bytes"] / MIB
        row["quantized_mib"] = report["quantized_bytes"] / MIB
        row["bits_per_quantized_param"] = report["bits_per_quantized_param"]
        row["quantized_layers"] = report["quantized_layers"]
        row["logits_rel_error"] = ok[0]["logits_rel_error_vs_full_precision"]
        row["logits_sha"] = ok[0]["logits_sha"]
        row["quantized_weights_sha"] = ok[0]["quantized_weights_sha"]
        row["same_logits_every_repeat"] = len({r["logits_sha"] for r in ok}) == 1
        row["report"] = report
        rows.append(row)
    reference = next((r for r in rows if r["path"] == REFERENCE and "error" not in r), None)
    for row in rows:
        if reference is None or "error" in row:
            continue
        row["time_vs_full"] = row["total_s"] / reference["total_s"]
        if row.get("peak_growth_mib") is not None and reference.get("peak_growth_mib"):
            row["growth_vs_full"] = row["peak_growth_mib"] / reference["peak_growth_mib"]
            row["peak_vs_full"] = row["peak_rss_mib"] / reference["peak_rss_mib"]
        if row.get("peak_anon_growth_mib") is not None and reference.get("peak_anon_growth_mib"):
            row["anon_growth_vs_full"] = row["peak_anon_growth_mib"] / reference["peak_anon_growth_mib"]
        row["same_weights_as_full"] = row["quantized_weights_sha"] == reference["quantized_weights_sha"]
        row["same_logits_as_full"] = row["logits_sha"] == reference["logits_sha"]
    return rows


def build_tables(rows: list[dict[str, Any]], saved: Mapping[str, Any], dtype: str) -> str:
    columns = {
        "path": "path",
        "total_s": "load s",
        "time_vs_full": "time / full",
        "quantize_s": "of which quantize s",
        "peak_rss_mib": "peak RSS MiB",
        "peak_growth_mib": "peak growth MiB",
        "growth_vs_full": "growth / full",
        "peak_anon_growth_mib": "anon. peak growth MiB",
        "rss_after_mib": "RSS after MiB",
        "rss_file_after_mib": "of which file MiB",
        "param_mib": "param MiB",
        "bits_per_quantized_param": "bits / q. param",
        "same_weights_as_full": "same 4-bit weights",
        "same_logits_as_full": "same logits",
    }
    table_rows = []
    for row in rows:
        if "error" in row:
            table_rows.append({"path": row["path"], "total_s": f"failed: {row['error']}"})
            continue
        table_rows.append({label: row.get(key) for key, label in columns.items()})
    formats = {
        "load s": ".1f",
        "time / full": ".2f",
        "of which quantize s": ".1f",
        "peak RSS MiB": ".0f",
        "peak growth MiB": ".0f",
        "growth / full": ".2f",
        "RSS after MiB": ".0f",
        "anon. peak growth MiB": ".0f",
        "of which file MiB": ".0f",
        "param MiB": ".1f",
        "bits / q. param": ".3f",
    }
    main = markdown_table(table_rows, list(columns.values()), formats)

    ok = next((r for r in rows if r["path"] == "load_quantized" and "error" not in r), None)
    ok = ok or next((r for r in rows if "error" not in r), None)
    report_md = ""
    if ok is not None:
        rep = ok["report"]
        report_rows = [
            {
                "part": f"quantized linear layers ({rep['quantized_layers']})",
                "parameters": rep["quantized_params"],
                "MiB before": rep["quantized_bytes_before"] / MIB,
                "MiB after": rep["quantized_bytes"] / MIB,
                "bits / param after": rep["bits_per_quantized_param"],
            },
            {
                "part": "kept full precision (embeddings, norms, lm_head)",
                "parameters": rep["kept_params"],
                "MiB before": rep["kept_bytes"] / MIB,
                "MiB after": rep["kept_bytes"] / MIB,
                "bits / param after": 8 * rep["kept_bytes"] / rep["kept_params"]
                if rep["kept_params"]
                else None,
            },
            {
                "part": "total",
                "parameters": rep["quantized_params"] + rep["kept_params"],
                "MiB before": rep["total_bytes_before"] / MIB,
                "MiB after": rep["total_bytes"] / MIB,
                "bits / param after": 8 * rep["total_bytes"] / (rep["quantized_params"] + rep["kept_params"]),
            },
        ]
        report_md = "\n" + markdown_table(
            report_rows,
            list(report_rows[0]),
            {"MiB before": ".1f", "MiB after": ".1f", "bits / param after": ".3f"},
        )
    return main + report_md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="checkpoint dtype")
    parser.add_argument(
        "--load-dtype",
        choices=DTYPES,
        default=None,
        help="dtype to load in (the full-precision model, and the weights kept unquantized); default --dtype",
    )
    parser.add_argument("--name", default=NAME, help="results file name (without extension)")
    parser.add_argument(
        "--compute-dtype", choices=DTYPES, default="float32", help="4-bit layers' compute dtype"
    )
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all paths (interleaved)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the saved model here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    add_worker_options(parser)
    args = parser.parse_args(argv)
    args.load_dtype = args.load_dtype or args.dtype
    return args


def worker_args(args: argparse.Namespace) -> list[str]:
    """The options every worker of this run gets."""
    return [
        "--dtype", args.dtype, "--load-dtype", args.load_dtype, "--compute-dtype", args.compute_dtype,
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]  # fmt: skip


def ensure_model(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Save the random checkpoint once (in a worker, so its memory is gone after); its file size."""
    if not (model_dir / "reference_logits.pt").exists():
        config_kwargs = llama_config_kwargs(args.hidden, args.layers, args.intermediate, args.vocab)
        print(f"saving a random {args.layers}-layer model to {model_dir} ...", flush=True)
        cmd = ["--worker", "save", "--model-dir", str(model_dir), "--config-json", json.dumps(config_kwargs)]
        saved = run_worker(__spec__.name, [*cmd, *worker_args(args)], args.timeout)
        if not saved.get("ok"):
            raise RuntimeError(f"saving the model failed: {saved.get('error')}")
    files = sorted(model_dir.glob("*.safetensors"))
    return {"file_bytes": sum(f.stat().st_size for f in files), "files": len(files)}


def run_paths(args: argparse.Namespace, model_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every path `--repeats` times, interleaved, each in a fresh worker; a refusing path is not retried."""
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in args.paths}
    refused: set[str] = set()
    for round_index, path in interleaved(args.paths, args.repeats):
        if path in refused:
            continue
        cmd = ["--worker", path, "--model-dir", str(model_dir), *worker_args(args)]
        result = run_worker(__spec__.name, cmd, args.timeout)
        runs[path].append(result)
        brief = (
            f"{result['total_s']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB"
            if result.get("ok")
            else f"failed: {result.get('error')}"
        )
        print(f"round {round_index + 1} {path}: {brief}", flush=True)
        if not result.get("ok"):
            refused.add(path)
    return runs


def describe(args: argparse.Namespace, params: int, saved: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """The Markdown header: what was measured, on what, and how to read the columns."""
    return (
        f"# Loading a {params / 1e6:.0f} M-parameter Llama-style model into NF4 + double quantization\n\n"
        f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}; "
        f"{args.dtype} safetensors checkpoint ({saved['file_bytes'] / MIB:.0f} MiB) loaded as "
        f"{args.load_dtype}, compute dtype "
        f"{args.compute_dtype}; torch {info['torch']}, bitsandbytes {info['bitsandbytes']}, transformers "
        f"{info['transformers']}, {info['cpu_count']} CPU cores, {args.threads or 'default'} torch "
        f"thread(s). Each path in its own process; time best of {args.repeats}, peak RSS (VmHWM, reset after "
        "imports) highest of them. Ratios are to the full-precision path. 'same 4-bit weights' / 'same "
        "logits': packed codes and absmax constants / logits of a 16-token forward are bit-identical to the "
        "full-precision-then-convert model's. 'anon. peak growth': highest anonymous (not file-backed) "
        "resident memory, sampled every 2 ms, minus its value at the reset; the difference to 'peak growth' "
        "is pages of the memory-mapped checkpoint, which the kernel can drop. 'of which file': file-backed "
        "part of the RSS after loading (the checkpoint still mapped).\n\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    if not Path("/proc/self/clear_refs").exists():
        print("note: no /proc/self/clear_refs; peak RSS includes the imports", file=sys.stderr)
    started = time.perf_counter()
    with model_folder(args.model_dir, "qlora-quantize-load-") as model_dir:
        saved = ensure_model(args, model_dir)
        runs = run_paths(args, model_dir)
    rows = aggregate(runs)
    params = next(
        (r["report"]["quantized_params"] + r["report"]["kept_params"] for r in rows if "report" in r), 0
    )
    info = {**machine_info(), "device": "cpu"}
    config_kwargs = llama_config_kwargs(args.hidden, args.layers, args.intermediate, args.vocab)
    payload = {
        "benchmark": NAME,
        "description": "Loading a Llama-style causal LM into 4-bit NF4 + DQ three ways; ratios to "
        "full_then_convert.",
        "config": {
            "model": {"type": "LlamaForCausalLM", **config_kwargs, "params": params},
            "checkpoint": {"dtype": args.dtype, **saved},
            "load_dtype": args.load_dtype,
            "quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": True},
            "compute_dtype": args.compute_dtype,
            "threads": args.threads,
            "repeats": args.repeats,
            "seed": args.seed,
            "timing": "wall time of the load call(s) in the worker, best of repeats; peak = max over repeats",
            "peak_memory": "VmHWM of the worker after reset via /proc/self/clear_refs (after imports and a "
            "tiny-layer warm-up); growth = peak - VmRSS at the reset",
            "paths": {p: PATH_LABELS[p] for p in runs},
        },
        "machine": info,
        "results": rows,
        "runs": runs,
        "runtime_s": time.perf_counter() - started,
    }
    table = describe(args, params, saved, info) + build_tables(rows, saved, args.dtype)
    write_results(args.out, args.name, payload, table)
    report_written(args.out, args.name, table, payload["runtime_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
