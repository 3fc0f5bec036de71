"""Training memory and speed, like for like: QLoRA against 32-bit LoRA, transformers + PEFT QLoRA, full FT.

Why: QLoRA exists to cut training memory without costing speed. The comparison only means something when
every configuration does the same work, so every one trains in train mode, with activation checkpointing
on every decoder layer and (where there are adapters) LoRA dropout on; the worker checks it (every module
in training mode, each decoder layer's forward run twice per step: once, and again in backward) and
refuses to report a run that does not. The same randomly initialised Llama-style causal LM (saved once as
safetensors) trains with batch 1 x 256 random tokens in each configuration, each in a fresh process:

- ``lora``: LoRA on the full-precision base (32-bit on CPU, bf16 on CUDA) with the package's ``LoRA``
  callback and ``QLoRAStrategy`` (the reference for every ratio);
- ``qlora``: the package: ``load_quantized`` (NF4 + double quant while streaming), then a Lightning Trainer
  with ``QLoRAPrecision``, ``LoRA`` and ``QLoRAStrategy`` (paged AdamW, checkpointing ``LlamaDecoderLayer``);
  4-bit matmuls in float32 on CPU, the same arithmetic as ``lora``;
- ``qlora_bf16``: the same with the 4-bit matmuls in bfloat16, which ``compute_dtype="auto"`` (the default)
  picks on CPUs with native bf16 (AVX512-BF16 / AMX) and on CUDA; CPU only (on CUDA it is ``qlora``);
- ``qlora_siblings``: ``qlora`` with ``LoRA(share_sibling_input=True)`` (one dropout mask and one stacked A
  matmul for q/k/v and for gate/up);
- ``qlora_python_loop``: ``qlora`` with the native 4-bit linear operator off
  (``LIGHTNING_QLORA_DISABLE_LINEAR_OP=1``): the Python band loop around the ctypes kernel that starts its own
  threads, the path before the operator (same bits); CPU only;
- ``qlora_heap``: ``qlora`` with ``limit_cpu_heap=False`` (in ``load_quantized`` and ``QLoRAPrecision``):
  glibc's allocator left alone, what the heap limit costs and saves; CPU only;
- ``peft_qlora``: ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant))``,
  ``prepare_model_for_kbit_training``, activation checkpointing, ``get_peft_model(LoraConfig(
  target_modules="all-linear"))``, ``bitsandbytes.optim.PagedAdamW`` and a plain loop doing the same steps;
- ``full``: full fine-tuning, torch AdamW (Lightning Trainer, ``QLoRAStrategy(optimizer=adamw)``).

LoRA settings (r=64, alpha=16, dropout 0.1, every linear layer but ``lm_head``), optimizer (lr 2e-4) and
clipping (0.3) are the same everywhere. Memory on CPU: the worker's peak resident set (``VmHWM``, reset
after the imports and again when training starts) and, sampled every 10 ms, its anonymous (``RssAnon``)
and file-backed (``RssFile``, pages of the memory-mapped checkpoint) parts; on CUDA
``torch.cuda.max_memory_allocated``. Configurations run interleaved (every other round reversed), for
each ``--threads`` setting; with ``--load quiet busy`` each run is repeated beside a process spinning on one
core (``benchmarks.busy_core``), and the tables add each configuration's slowdown (busy / quiet s/step) and
that slowdown over LoRA's.

Run: ``python -m benchmarks.train_memory_speed [--model-size 0.5b] [--threads 1 2] [--repeats 2]
[--load quiet busy] [--configs lora qlora qlora_python_loop]``
(``--model-size tiny`` for a smoke run of a few seconds per configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.busy_core import LOADS, busy_core, default_core
from benchmarks.harness import (
    LLAMA_SIZES,
    MIB,
    LikeForLike,
    ProcessMeter,
    StepMeter,
    add_worker_options,
    base_parser,
    build_on_meta,
    describe_exception,
    fit_causal_lm,
    interleaved,
    library_warm_up,
    llama_param_count,
    llama_size,
    machine_info,
    markdown_table,
    model_folder,
    ratios_to,
    report_written,
    run_worker,
    save_random_model,
    set_threads,
    torch_dtype,
    write_results,
    write_worker_result,
)

NAME = "train_memory_speed"
CONFIGS = (
    "qlora", "qlora_bf16", "qlora_siblings", "qlora_python_loop", "qlora_heap", "lora", "peft_qlora", "full",
)  # fmt: skip
CPU_ONLY = ("qlora_bf16", "qlora_heap", "qlora_python_loop")
# Environment of a configuration's worker (set before anything is imported there).
CONFIG_ENV = {"qlora_python_loop": {"LIGHTNING_QLORA_DISABLE_LINEAR_OP": "1"}}
REFERENCE = "lora"
CONFIG_LABELS = {
    "full": "full fine-tuning (AdamW)",
    "lora": "LoRA, full-precision base (package)",
    "qlora": "QLoRA (this package)",
    "qlora_bf16": "QLoRA, bf16 compute (this package; compute_dtype='auto' on CPUs with native bf16)",
    "qlora_heap": "QLoRA without the heap limit (this package, limit_cpu_heap=False)",
    "qlora_python_loop": "QLoRA, Python band loop (this package with the native 4-bit linear operator off)",
    "qlora_siblings": "QLoRA, sibling adapters sharing mask and A matmul (this package, share_sibling_input)",
    "peft_qlora": "QLoRA (transformers + PEFT + bnb)",
}
LORA = {"r": 64, "alpha": 16.0, "dropout": 0.1}
LR = 2e-4
MAX_GRAD_NORM = 0.3

# --------------------------------------------------------------------------------------------------------
# Worker: one configuration in this process.
# --------------------------------------------------------------------------------------------------------


def token_batches(vocab: int, steps: int, seq_len: int, seed: int) -> Any:
    """Random token ids, one row per step: identical data for every configuration."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (steps, seq_len), generator=generator)


def param_summary(model: Any) -> dict[str, Any]:
    """Parameter bytes (4-bit weights at their packed size, quant constants included) and counts."""
    from lightning_qlora import quantization_report

    report = quantization_report(model)
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in unique if p.requires_grad]
    return {
        "param_bytes": report.total_bytes,
        "quantized_layers": report.quantized_layers,
        "bits_per_quantized_param": report.bits_per_quantized_param if report.quantized_layers else None,
        "trainable_params": sum(p.numel() for p in trainable),
        "gradient_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "total_params": report.quantized_params + report.kept_params,
    }


def optimizer_state_bytes(optimizer: Any) -> int:
    import torch

    values = (v for state in optimizer.state.values() for v in state.values())
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def load_model(config_name: str, model_dir: Path, device: Any, compute_dtype: Any) -> Any:
    """The base model, in train mode: quantized while loading for ``qlora``, full precision otherwise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_qlora import load_quantized
    from lightning_qlora.quantization import QuantizationConfig

    base_dtype = torch.float32 if device.type == "cpu" else compute_dtype
    if config_name.startswith("qlora"):
        model = build_on_meta(LlamaConfig.from_pretrained(model_dir))
        qconfig = QuantizationConfig(compute_dtype=compute_dtype)
        load_quantized(
            model,
            model_dir,
            qconfig,
            device=device,
            compute_dtype=compute_dtype,
            dtype=base_dtype,
            limit_cpu_heap=config_name != "qlora_heap",
        )
    else:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=base_dtype)
    # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, dropout and
    # activation checkpointing (training forwards only) would be off.
    return model.train()


def run_lightning(config_name: str, model_dir: Path, args: argparse.Namespace, ctx: dict[str, Any]) -> None:
    """full / lora / qlora: one LightningModule, the package's strategy; only plugins and callbacks differ."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_qlora import LoRA, OptimizerConfig, QLoRAPrecision, QLoRAStrategy

    meter, summary = ctx["meter"], ctx["summary"]
    compute_dtype = torch_dtype("bfloat16" if config_name == "qlora_bf16" else args.compute_dtype)
    model = load_model(config_name, model_dir, ctx["device"], compute_dtype)
    callbacks: list[Any] = []
    plugins: list[Any] = []
    if config_name != "full":
        share = config_name == "qlora_siblings"
        callbacks.append(
            LoRA(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], share_sibling_input=share)
        )
    if config_name.startswith("qlora"):
        limit = config_name != "qlora_heap"
        plugins.append(QLoRAPrecision(compute_dtype=compute_dtype, log_report=False, limit_cpu_heap=limit))
    optimizer = OptimizerConfig(name="adamw" if config_name == "full" else "paged_adamw", lr=LR)
    strategy = QLoRAStrategy(
        optimizer=optimizer,
        max_grad_norm=MAX_GRAD_NORM,
        activation_checkpointing=LlamaDecoderLayer,
    )

    def on_step(trainer: Any) -> None:
        if meter.step == meter.total:
            summary["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizers[0])

    probe = fit_causal_lm(
        model,
        ctx["data"],
        meter,
        strategy,
        plugins,
        callbacks,
        on_start=lambda pl_module: summary.update(param_summary(pl_module.model)),
        on_step=on_step,
    )
    summary["like_for_like"] = probe.verify(expect_dropout=config_name != "full")


def peft_model(model_dir: Path, device: Any, compute_dtype: Any, lora: Mapping[str, float] = LORA) -> Any:
    """transformers loads in 4 bit, PEFT prepares, checkpoints and adapts: the reference stack's model
    (``lora``: r, alpha, dropout; other benchmarks pass their own to compare like for like)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    base_dtype = torch.float32 if device.type == "cpu" else compute_dtype
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    model = LlamaForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bnb_config,
        dtype=base_dtype,
        device_map=device_map,
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora_config = LoraConfig(
        target_modules="all-linear",
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config).train()


def peft_steps(
    model: Any,
    batches: Iterable[Any],
    params: Sequence[Any],
    optimizer: Any,
    meter: StepMeter,
    after_step: Callable[[], object] = lambda: None,
) -> None:
    """The PEFT reference's plain loop: the steps the Trainer runs for ours (loss, backward, clip, step)."""
    import torch

    for ids in batches:
        meter.before_step()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.after_step(float(loss.detach()))
        after_step()


def run_peft(model_dir: Path, args: argparse.Namespace, ctx: dict[str, Any]) -> None:
    """The reference stack: transformers + PEFT, bitsandbytes' PagedAdamW, a plain PyTorch loop."""
    import bitsandbytes as bnb

    device, meter, summary = ctx["device"], ctx["meter"], ctx["summary"]
    model = peft_model(model_dir, device, torch_dtype(args.compute_dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    summary.update(param_summary(model))
    probe = LikeForLike(model)
    meter.start_training()
    batches = (batch.unsqueeze(0).to(device) for batch in ctx["data"])
    peft_steps(model, batches, params, optimizer, meter, after_step=probe.step_done)
    summary["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    summary["like_for_like"] = probe.verify(expect_dropout=True)


def import_everything() -> None:
    """The same imports in every configuration, so each starts from the same resident baseline."""
    import bitsandbytes  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lightning_qlora  # noqa: F401


def worker_main(args: argparse.Namespace) -> int:
    """Measure one configuration; write a JSON result (or the reason it failed) to ``args.result``."""
    import torch

    set_threads(args.threads[0])
    if args.worker == "save":
        info = save_random_model(json.loads(args.config_json), "float32", args.seed, Path(args.model_dir))
        write_worker_result(args.result, {"ok": True, **info})
        return 0
    import_everything()
    from lightning_qlora._memory import release_freed_memory
    from lightning_qlora.quantization.cpu_caching_allocator import release_cached

    device = torch.device(args.device)
    library_warm_up(torch_dtype(args.compute_dtype))
    gc.collect()
    release_cached()
    release_freed_memory()
    model_dir = Path(args.model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    total = args.warmup + args.steps
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    try:
        with ProcessMeter(interval=0.01) as process:
            meter = StepMeter(device, args.warmup, total, process)
            ctx = {
                "device": device,
                "meter": meter,
                "summary": {},
                "data": token_batches(vocab, total, args.seq_len, args.seed),
            }
            if args.worker == "peft_qlora":
                run_peft(model_dir, args, ctx)
            else:
                run_lightning(args.worker, model_dir, args, ctx)
    except Exception as err:
        write_worker_result(args.result, {"ok": False, "error": describe_exception(err)})
        return 0
    result = {
        "ok": True,
        "config": args.worker,
        "threads": args.threads[0],
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process VmHWM",
        **meter.result(),
        "worker_s": time.perf_counter() - started,
        **ctx["summary"],
    }
    write_worker_result(args.result, result)
    return 0


# --------------------------------------------------------------------------------------------------------
# Parent: save once, run the configurations interleaved, aggregate, write tables and the plot.
# --------------------------------------------------------------------------------------------------------

PEAK_KEYS = (
    "peak_mib",
    "train_peak_mib",
    "peak_anon_sampled_mib",
    "train_peak_anon_mib",
)
RATIO_KEYS = (
    *PEAK_KEYS,
    "peak_file_sampled_mib",
    "param_mib",
    "s_per_step",
    "cpu_s_per_step",
    "tokens_per_s",
)


def aggregate_one(name: str, ok: Sequence[Mapping[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    """One configuration at one thread count: fastest median step over repeats, highest peaks."""
    best = min(ok, key=lambda r: r["s_per_step"])

    def highest(key: str) -> float | None:
        values = [r[key] for r in ok if r.get(key) is not None]
        return max(values) if values else None

    return {
        "config": name,
        "threads": best.get("threads"),
        "label": CONFIG_LABELS[name],
        "repeats": len(ok),
        "baseline_mib": highest("baseline_mib"),
        "setup_peak_mib": highest("setup_peak_mib"),
        **{key: highest(key) for key in (*PEAK_KEYS, "peak_file_sampled_mib", "train_peak_file_mib")},
        "param_mib": best["param_bytes"] / MIB,
        "optimizer_state_mib": best.get("optimizer_state_bytes", 0) / MIB,
        "gradient_mib": best.get("gradient_bytes", 0) / MIB,
        "trainable_params": best["trainable_params"],
        "total_params": best["total_params"],
        "bits_per_quantized_param": best.get("bits_per_quantized_param"),
        "s_per_step": best["s_per_step"],
        "cpu_s_per_step": best["cpu_s_per_step"],
        "s_per_step_all": [r["s_per_step"] for r in ok],
        "tokens_per_s": tokens_per_step / best["s_per_step"],
        "first_loss": best["losses"][0],
        "last_loss": best["losses"][-1],
        "like_for_like": best.get("like_for_like"),
    }


def run_key(name: str, threads: int, load: str) -> str:
    """``config@threads``, with ``@busy`` for runs beside a busy core (quiet keys as before)."""
    return f"{name}@{threads}" + ("" if load == "quiet" else f"@{load}")


def parse_key(key: str) -> tuple[str, int, str]:
    name, threads, *load = key.split("@")
    return name, int(threads or 0), load[0] if load else "quiet"


def aggregate(runs: Mapping[str, list[dict[str, Any]]], tokens_per_step: int) -> list[dict[str, Any]]:
    """Rows per (configuration, threads, load), with ratios to LoRA at the same thread count and load, and
    for busy rows the slowdown over the same configuration's quiet row and that slowdown over LoRA's."""
    rows: list[dict[str, Any]] = []
    for key, results in runs.items():
        name, threads, load = parse_key(key)
        ok = [r for r in results if r.get("ok")]
        if not ok:
            error = results[0].get("error", "failed") if results else "not run"
            rows.append({"config": name, "threads": threads, "load": load, "error": error})
            continue
        rows.append({**aggregate_one(name, ok, tokens_per_step), "threads": threads, "load": load})
    for threads, load in sorted({(r["threads"], r["load"]) for r in rows}, key=str):
        ratios_to(
            [r for r in rows if r["threads"] == threads and r["load"] == load],
            "config",
            REFERENCE,
            RATIO_KEYS,
            "_vs_lora",
        )
    add_slowdowns(rows)
    return rows


def add_slowdowns(rows: Sequence[dict[str, Any]]) -> None:
    """``slowdown``: busy / quiet median s/step of one configuration; ``slowdown_vs_lora``: over LoRA's."""
    quiet = {(r["config"], r["threads"]): r for r in rows if r["load"] == "quiet" and "error" not in r}
    busy = [r for r in rows if r["load"] != "quiet" and "error" not in r]
    for row in busy:
        base = quiet.get((row["config"], row["threads"]))
        if base is not None:
            row["slowdown"] = row["s_per_step"] / base["s_per_step"]
    for row in busy:
        lora = next((r for r in busy if r["config"] == REFERENCE and r["threads"] == row["threads"]), None)
        if row.get("slowdown") and lora is not None and lora.get("slowdown"):
            row["slowdown_vs_lora"] = row["slowdown"] / lora["slowdown"]


MEMORY_COLUMNS = {
    "config": "configuration",
    "threads": "threads",
    "load": "load",
    "peak_mib": "peak RSS MiB",
    "peak_mib_vs_lora": "peak / LoRA",
    "train_peak_mib": "training peak RSS MiB",
    "peak_anon_sampled_mib": "anon. peak MiB",
    "peak_anon_sampled_mib_vs_lora": "anon. peak / LoRA",
    "peak_file_sampled_mib": "file-backed peak MiB",
    "setup_peak_mib": "load+setup peak MiB",
    "param_mib": "param MiB",
    "optimizer_state_mib": "optimizer state MiB",
}
SPEED_COLUMNS = {
    "config": "configuration",
    "threads": "threads",
    "load": "load",
    "s_per_step": "s / step",
    "s_per_step_vs_lora": "s / step / LoRA",
    "slowdown": "busy / quiet",
    "slowdown_vs_lora": "slowdown / LoRA's",
    "cpu_s_per_step": "CPU s / step",
    "cpu_s_per_step_vs_lora": "CPU s / step / LoRA",
    "s_per_step_all": "s / step, each repeat",
    "first_loss": "loss step 1",
    "last_loss": "loss last step",
}


def row_order(row: Mapping[str, Any]) -> tuple[int, int, int]:
    return row["threads"], LOADS.index(row["load"]), CONFIGS.index(row["config"])


def build_tables(rows: list[dict[str, Any]], device: str) -> str:
    """A memory table and a speed table, one row per (configuration, threads)."""
    formats = {label: ".0f" for label in MEMORY_COLUMNS.values() if label.endswith("MiB")}
    formats.update(
        {label: ".2f" for label in (*MEMORY_COLUMNS.values(), *SPEED_COLUMNS.values()) if "/" in label}
    )
    formats.update(
        {
            "s / step": ".2f",
            "CPU s / step": ".2f",
            "loss step 1": ".4f",
            "loss last step": ".4f",
        }
    )
    memory = dict(MEMORY_COLUMNS)
    if device == "cuda":  # no anonymous or file-backed pages on a GPU
        memory = {
            k: v.replace("RSS", "GPU") for k, v in memory.items() if "anon" not in k and "file" not in k
        }

    def render(columns: Mapping[str, str]) -> str:
        table_rows = []
        for row in sorted(rows, key=row_order):
            if "error" in row:
                table_rows.append(
                    {
                        "configuration": row["config"],
                        "threads": row["threads"],
                        "load": row["load"],
                        "s / step": None,
                    }
                )
                table_rows[-1][list(columns.values())[3]] = f"failed: {row['error']}"
                continue
            line = {label: row.get(key) for key, label in columns.items()}
            if "s / step, each repeat" in line:
                line["s / step, each repeat"] = ", ".join(f"{v:.2f}" for v in row["s_per_step_all"])
            table_rows.append(line)
        return markdown_table(table_rows, list(columns.values()), formats)

    return render(memory) + "\n" + render(SPEED_COLUMNS)


def plot_memory(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """One bar pair per configuration (one thread): peak RSS split into anonymous and file-backed parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [
        r
        for r in rows
        if "error" not in r and r["load"] == "quiet" and r["threads"] == min(x["threads"] for x in rows)
    ]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    for j, row in enumerate(ok):
        peak, anon = (
            row["peak_mib"] / 1024,
            (row.get("peak_anon_sampled_mib") or 0) / 1024,
        )
        ax.bar(j, peak, 0.6, color="#c9d6ea", label="peak RSS (VmHWM)" if j == 0 else None)
        ax.bar(
            j,
            anon,
            0.35,
            color="#4c72b0",
            label="anonymous peak (sampled)" if j == 0 else None,
        )
        ratio = row.get("peak_mib_vs_lora")
        note = f"{peak:.2f} GiB" + (f"\n{ratio:.2f}x LoRA" if ratio is not None else "")
        ax.annotate(
            note,
            (j, peak),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_xticks(
        range(len(ok)),
        [CONFIG_LABELS[r["config"]].replace(" (", "\n(") for r in ok],
        fontsize=9,
    )
    ax.set_ylabel("GiB")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, threads_default=[1, 2], threads_nargs="+")  # every config at each count
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--model-size", choices=list(LLAMA_SIZES), default="0.5b")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--compute-dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=None, help="default: all")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds over the configurations (interleaved)",
    )
    parser.add_argument(
        "--load",
        nargs="+",
        choices=LOADS,
        default=["quiet"],
        help="quiet, and/or busy: beside a process spinning on --busy-core (interleaved with quiet runs)",
    )
    parser.add_argument("--busy-core", type=int, default=None, help="default: the highest-numbered core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the saved model here")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per worker")
    parser.add_argument("--name", default=NAME, help="results file name (without extension)")
    add_worker_options(parser)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compute_dtype is None:
        args.compute_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.configs is None:
        args.configs = [c for c in CONFIGS if c not in CPU_ONLY or args.device == "cpu"]
    if "busy" in args.load and args.busy_core is None:
        args.busy_core = default_core()
    return args


def worker_args(args: argparse.Namespace, threads: int) -> list[str]:
    return [
        "--device", args.device, "--compute-dtype", args.compute_dtype, "--threads", str(threads),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
        "--seed", str(args.seed),
    ]  # fmt: skip


def ensure_model(args: argparse.Namespace, model_dir: Path) -> None:
    """Save the random model once, in a worker (so its memory is gone before anything is measured)."""
    if (model_dir / "config.json").exists():
        return
    print(f"saving a random {args.model_size} model to {model_dir} ...", flush=True)
    cmd = [
        "--worker",
        "save",
        "--model-dir",
        str(model_dir),
        "--config-json",
        json.dumps(llama_size(args.model_size)),
    ]
    saved = run_worker(__spec__.name, [*cmd, *worker_args(args, 0)], args.timeout)
    if not saved.get("ok"):
        raise RuntimeError(f"saving the model failed: {saved.get('error')}")


def run_all(
    args: argparse.Namespace,
    model_dir: Path,
    after_each: Callable[[dict[str, list[dict[str, Any]]]], object],
) -> dict[str, list[dict[str, Any]]]:
    """Every configuration at every thread count, `--repeats` interleaved rounds; a failure is not retried.

    `after_each` gets the runs so far after every worker (results are written as they come).
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for threads in args.threads:
        for round_index, name in interleaved(args.configs, args.repeats):
            loads = args.load if round_index % 2 == 0 else list(reversed(args.load))
            for load in loads:
                run_one(args, model_dir, runs, round_index, name, threads, load)
                after_each(runs)
    return runs


def run_one(
    args: argparse.Namespace,
    model_dir: Path,
    runs: dict[str, list[dict[str, Any]]],
    round_index: int,
    name: str,
    threads: int,
    load: str,
) -> None:
    """One worker (beside a busy core for ``load == "busy"``); its result is appended to `runs`."""
    key = run_key(name, threads, load)
    if any(not r.get("ok") for r in runs.get(key, [])):
        return
    cmd = ["--worker", name, "--model-dir", str(model_dir), *worker_args(args, threads)]
    with busy_core(args.busy_core if load == "busy" else None):
        result = run_worker(__spec__.name, cmd, args.timeout, extra_env=CONFIG_ENV.get(name))
    runs.setdefault(key, []).append(result)
    brief = (
        f"{result['s_per_step']:.2f} s/step, peak {result['peak_mib']:.0f} MiB, anon. "
        f"{result['peak_anon_sampled_mib']:.0f}, file {result['peak_file_sampled_mib']:.0f}"
        if result.get("ok")
        else f"failed: {result.get('error')}"
    )
    print(f"{threads} thread(s), {load}, round {round_index + 1}, {name}: {brief}", flush=True)


def describe(args: argparse.Namespace, info: Mapping[str, Any]) -> str:
    """The Markdown header: the model, the settings, and how to read the columns."""
    config = llama_size(args.model_size)
    params = llama_param_count(config)
    where = info.get("cuda_device") if args.device.startswith("cuda") else f"{info['cpu_count']} CPU cores"
    return (
        f"# Training memory and speed, {params / 1e6:.0f} M-parameter Llama-style model\n\n"
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, intermediate "
        f"{config['intermediate_size']}, vocab {config['vocab_size']}; batch 1 x {args.seq_len} tokens. "
        "Every configuration in train mode with activation checkpointing on every decoder layer (checked: "
        "each layer ran twice a step) and LoRA dropout 0.1 active; LoRA r=64, alpha=16 on every linear "
        f"layer but lm_head; 4-bit runs NF4 + double quant, compute dtype {args.compute_dtype}. "
        f"Device `{args.device}`, {where}, torch {info['torch']}, bitsandbytes {info['bitsandbytes']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, lightning {info['lightning']}; load "
        f"average at the end {info.get('loadavg')}. {args.warmup} warm-up + {args.steps} timed steps, "
        f"median step, best of {args.repeats} interleaved repeats; ratios are to LoRA at the same thread "
        "count. Peak RSS: the worker's VmHWM from after its imports (loading included); anon. / file-backed "
        "peak: RssAnon / RssFile sampled every 10 ms (the file-backed part is pages of the memory-mapped "
        "checkpoint, which the kernel can drop). CPU s / step: process CPU time."
        + (
            f" Busy: beside a process spinning on core {args.busy_core}, started before the worker and "
            "stopped after it; busy / quiet is one configuration's slowdown, slowdown / LoRA's that over "
            "LoRA's at the same thread count."
            if "busy" in args.load
            else ""
        )
        + "\n\n"
    )


def write_all(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], started: float) -> str:
    """Aggregate the runs so far and write JSON, Markdown and the plot; returns the Markdown."""
    rows = aggregate(runs, args.seq_len)
    info = {**machine_info(), "device": args.device}
    config = llama_size(args.model_size)
    payload = {
        "benchmark": NAME,
        "description": "Training peak memory and step time, like for like; ratios to LoRA.",
        "config": {
            "model": {"type": "LlamaForCausalLM", "size": args.model_size, **config},
            "params": llama_param_count(config),
            **{
                k: getattr(args, k)
                for k in (
                    "seq_len",
                    "warmup",
                    "steps",
                    "repeats",
                    "compute_dtype",
                    "seed",
                    "load",
                    "busy_core",
                )
            },
            "batch": 1,
            "threads": args.threads,
            "lora": {**LORA, "targets": "every linear layer but lm_head"},
            "optimizer": {
                "lr": LR,
                "full": "torch AdamW",
                "others": "bitsandbytes PagedAdamW (32-bit state)",
            },
            "max_grad_norm": MAX_GRAD_NORM,
            "activation_checkpointing": "every LlamaDecoderLayer, non-reentrant; checked per step",
            "configs": {n: CONFIG_LABELS[n] for n in args.configs},
        },
        "machine": info,
        "results": rows,
        "runs": runs,
        "runtime_s": time.perf_counter() - started,
    }
    table = describe(args, info) + build_tables(rows, "cuda" if args.device.startswith("cuda") else "cpu")
    write_results(args.out, args.name, payload, table)
    title = f"Training memory, {args.model_size} Llama, batch 1 x {args.seq_len}, {args.device}"
    plot_memory(rows, args.out / f"{args.name}.png", title)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    started = time.perf_counter()
    with model_folder(args.model_dir, "qlora-train-bench-") as model_dir:
        ensure_model(args, model_dir)
        runs = run_all(args, model_dir, lambda so_far: write_all(args, so_far, started))
    table = write_all(args, runs, started)
    report_written(
        args.out,
        args.name,
        table,
        time.perf_counter() - started,
        args.out / f"{args.name}.png",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
