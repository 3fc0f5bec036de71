"""Training memory and speed: full fine-tuning, 32-bit LoRA, QLoRA with this package, QLoRA with PEFT.

Why: QLoRA exists to cut training memory. Fewer parameter bytes are not enough: the process's peak must
drop too (activations, gradients, optimizer state, dequantization temporaries and loading all count), and
the package should be no slower than the reference stack (transformers + PEFT + bitsandbytes). This
script trains the same randomly initialised Llama-style causal LM (saved once as safetensors) for a few
steps in four configurations, each in a fresh subprocess, with batch 1 x 256 random tokens and activation
checkpointing on every decoder layer:

- ``full``: full fine-tuning, torch AdamW (Lightning Trainer, ``QLoRAStrategy(optimizer=adamw)``, no LoRA);
- ``lora``: LoRA on the full-precision base (32-bit on CPU, bf16 on CUDA) with the package's ``LoRA``
  callback and ``QLoRAStrategy`` (the reference for every ratio);
- ``qlora``: the package: ``load_quantized`` (meta model, NF4 + double quant while streaming), then a
  Lightning Trainer with ``QLoRAPrecision``, ``LoRA`` and ``QLoRAStrategy`` (paged AdamW, activation
  checkpointing of ``LlamaDecoderLayer``);
- ``peft_qlora``: ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant))``,
  ``prepare_model_for_kbit_training``, activation checkpointing, ``get_peft_model(LoraConfig(
  target_modules="all-linear", r=64, lora_alpha=16, lora_dropout=0.1))``, ``bitsandbytes.optim.PagedAdamW``
  and a plain PyTorch loop doing the same steps (clip grad norm 0.3, as the strategy does).

LoRA settings (r=64, alpha=16, dropout 0.1, every linear layer but ``lm_head``), optimizer (lr 2e-4) and
clipping are the same everywhere; both 4-bit runs use the same compute dtype (``--compute-dtype``).
Memory is the subprocess's peak resident set (``VmHWM``, reset after the imports and again when training
starts) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Run: ``python benchmarks/train_memory_speed.py [--model-size 0.5b] [--steps 3] [--out benchmarks/results]``
(``--model-size tiny`` for a smoke run of a few seconds per configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:  # run as ``python benchmarks/train_memory_speed.py`` (script dir on sys.path) or as a module
    from _results import machine_info, markdown_table, write_results
    from quantize_load import (
        AnonPeakSampler,
        build_on_meta,
        describe_exception,
        library_warm_up,
        llama_config_kwargs,
        mib,
        proc_status_kib,
        reset_peak_rss,
        run_worker,
        save_random_model,
        torch_dtype,
        write_worker_result,
    )
except ImportError:  # pragma: no cover - depends on how the script is launched
    from benchmarks._results import machine_info, markdown_table, write_results
    from benchmarks.quantize_load import (
        AnonPeakSampler,
        build_on_meta,
        describe_exception,
        library_warm_up,
        llama_config_kwargs,
        mib,
        proc_status_kib,
        reset_peak_rss,
        run_worker,
        save_random_model,
        torch_dtype,
        write_worker_result,
    )

NAME = "train_memory_speed"
CONFIGS = ("full", "lora", "qlora", "peft_qlora")
REFERENCE = "lora"
CONFIG_LABELS = {
    "full": "full fine-tuning (AdamW)",
    "lora": "LoRA, full-precision base (package)",
    "qlora": "QLoRA (this package)",
    "peft_qlora": "QLoRA (transformers + PEFT + bnb)",
}
# name: (hidden, layers, intermediate, vocab)
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 2, 352, 1000),
    "small": (512, 8, 1408, 32000),
    "0.5b": (1024, 24, 4096, 32000),
}
LORA = {"r": 64, "alpha": 16.0, "dropout": 0.1}
LR = 2e-4
MAX_GRAD_NORM = 0.3
MIB = 2**20


# --------------------------------------------------------------------------------------------------------
# Worker: one configuration in this process.
# --------------------------------------------------------------------------------------------------------


class Meter:
    """Per-step wall and CPU time, and the memory peaks before and during training.

    `start_training` is called once the model is loaded and set up, right before the first step: it
    records the peak so far (loading and setup) and resets it, so the training peak is measured alone.
    """

    def __init__(self, device: Any, warmup: int, total: int, profile_path: Path | None) -> None:
        self.device = device
        self.warmup = warmup
        self.total = total
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []
        # Growth from step to step would mean a leak or allocator fragmentation.
        self.rss_after_step_mib: list[float | None] = []
        self.anon_after_step_mib: list[float | None] = []
        self.setup_peak_mib: float | None = None
        self.train_peak_mib: float | None = None
        self.profile_path = profile_path
        self.sampler: AnonPeakSampler | None = None
        self.anon_peak_mib: float | None = None
        self._profiler: Any = None
        self._t0 = 0.0
        self._c0 = 0.0
        self.step = 0

    def peak_mib(self) -> float | None:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return mib(proc_status_kib("VmHWM"))

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def start_training(self) -> None:
        self.setup_peak_mib = self.peak_mib()
        gc.collect()
        self.reset_peak()

    def before_step(self) -> None:
        # The profiled step comes after the measured ones: the profiler's own memory must not count.
        if self.profile_path is not None and self.step == self.total:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
            )
            self._profiler = profile(activities=activities, record_shapes=True)
            self._profiler.__enter__()
        self._sync()
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    def after_step(self, loss: float) -> None:
        self._sync()
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._c0
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            assert self.profile_path is not None
            self.profile_path.write_text(table)
            self._profiler = None
        self.step += 1
        if self.step > self.total:
            return
        self.losses.append(loss)
        self.rss_after_step_mib.append(mib(proc_status_kib("VmRSS")))
        self.anon_after_step_mib.append(mib(proc_status_kib("RssAnon")))
        if self.step > self.warmup:
            self.wall.append(wall)
            self.cpu.append(cpu)
        if self.step == self.total:
            self.train_peak_mib = self.peak_mib()
            if self.sampler is not None:  # read now: a profiled step may follow, and must not count
                self.sampler.sample()
                self.anon_peak_mib = mib(self.sampler.peak_anon_kib)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def base_param_count(config: Mapping[str, Any]) -> int:
    """Parameters of the model before adapters (MHA, untied head): what every configuration starts from."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return config["num_hidden_layers"] * per_layer + 2 * vocab * hidden + hidden


def token_batches(vocab: int, steps: int, seq_len: int, seed: int) -> Any:
    """Random token ids, one row per step: identical data for every configuration."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (steps, seq_len), generator=generator)


def param_summary(model: Any) -> dict[str, Any]:
    """Parameter bytes (4-bit weights at their packed size, quant constants included) and counts."""
    from lightning_qlora import quantization_report
    from lightning_qlora.lora.inject import logical_numel

    report = quantization_report(model)
    seen: set[int] = set()
    trainable = trainable_bytes = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += logical_numel(param)
        if param.requires_grad:
            trainable += param.numel()
            trainable_bytes += param.numel() * param.element_size()
    return {
        "param_bytes": report.total_bytes,
        "quantized_layers": report.quantized_layers,
        "bits_per_quantized_param": report.bits_per_quantized_param if report.quantized_layers else None,
        "trainable_params": trainable,
        "gradient_bytes": trainable_bytes,  # one gradient per trainable parameter, same dtype
        "total_params": total,
    }


def optimizer_state_bytes(optimizer: Any) -> int:
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def run_lightning(
    config_name: str,
    model_dir: Path,
    args: argparse.Namespace,
    device: Any,
    data: Any,
    meter: Meter,
    summary: dict[str, Any],
) -> None:
    """full / lora / qlora: one LightningModule, the package's strategy; only plugins and callbacks differ."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_qlora import LoRA, OptimizerConfig, QLoRAPrecision, QLoRAStrategy, load_quantized
    from lightning_qlora.quantization import QuantizationConfig

    compute_dtype = torch_dtype(args.compute_dtype)
    base_dtype = torch.float32 if device.type == "cpu" else compute_dtype
    if config_name == "qlora":
        qconfig = QuantizationConfig(compute_dtype=compute_dtype)
        model = build_on_meta(LlamaConfig.from_pretrained(model_dir))
        load_quantized(
            model, model_dir, qconfig, device=device, compute_dtype=compute_dtype, dtype=base_dtype
        )
    else:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=base_dtype)

    class CausalLM(pl.LightningModule):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, dropout
            # and the strategy's activation checkpointing (training forwards only) would be off.
            self.model.train()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch).loss

    class MeterCallback(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            summary.update(param_summary(pl_module.model))
            meter.start_training()

        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            meter.before_step()

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            meter.after_step(float(outputs["loss"]))
            if meter.step == meter.total:
                summary["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizers[0])

    callbacks: list[Callback] = [MeterCallback()]
    plugins: list[Any] = []
    optimizer = OptimizerConfig(name="adamw" if config_name == "full" else "paged_adamw", lr=LR)
    if config_name in ("lora", "qlora"):
        callbacks.insert(0, LoRA(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"]))
    if config_name == "qlora":
        plugins.append(QLoRAPrecision(compute_dtype=compute_dtype, log_report=False))
    strategy = QLoRAStrategy(
        optimizer=optimizer, max_grad_norm=MAX_GRAD_NORM, activation_checkpointing=LlamaDecoderLayer
    )
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        plugins=plugins or None,
        precision=None if plugins else ("32-true" if base_dtype == torch.float32 else "bf16-true"),
        callbacks=callbacks,
        max_steps=len(data),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = DataLoader(data, batch_size=1, shuffle=False)
    trainer.fit(CausalLM(model), loader)


def run_peft(
    model_dir: Path, args: argparse.Namespace, device: Any, data: Any, meter: Meter, summary: dict[str, Any]
) -> None:
    """The reference stack: transformers loads in 4 bit, PEFT adapts, a plain loop trains."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    compute_dtype = torch_dtype(args.compute_dtype)
    base_dtype = torch.float32 if device.type == "cpu" else compute_dtype
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    model = LlamaForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_config, dtype=base_dtype, device_map=device_map
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias); both default to
    # non-reentrant torch.utils.checkpoint on every decoder layer, as the package's strategy does.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    lora_config = LoraConfig(
        target_modules="all-linear",
        r=LORA["r"],
        lora_alpha=int(LORA["alpha"]),
        lora_dropout=LORA["dropout"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    summary.update(param_summary(model))
    meter.start_training()
    for batch in data:
        batch = batch.unsqueeze(0).to(device)
        meter.before_step()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.after_step(float(loss.detach()))
    summary["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)


def worker_main(args: argparse.Namespace) -> int:
    result_path = Path(args.result)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "save":
        info = save_random_model(json.loads(args.config_json), "float32", args.seed, Path(args.model_dir))
        write_worker_result(result_path, {"ok": True, **info})
        return 0

    # The same imports in every configuration, so each starts from the same resident baseline.
    import bitsandbytes  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lightning_qlora  # noqa: F401
    from lightning_qlora._memory import release_freed_memory

    device = torch.device(args.device)
    library_warm_up(torch_dtype(args.compute_dtype))
    gc.collect()
    release_freed_memory()
    model_dir = Path(args.model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    total_steps = args.warmup + args.steps
    data = token_batches(vocab, total_steps + (1 if args.profile_dir else 0), args.seq_len, args.seed)
    torch.manual_seed(args.seed)
    profile_path = Path(args.profile_dir) / f"{args.worker}.txt" if args.profile_dir else None
    meter = Meter(device, args.warmup, total_steps, profile_path)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mib = torch.cuda.memory_allocated(device) / MIB
    else:
        reset_peak_rss()
        base_mib = mib(proc_status_kib("VmRSS"))
    base_anon_mib = mib(proc_status_kib("RssAnon"))
    summary: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        with AnonPeakSampler(interval=0.01) as sampler:
            meter.sampler = sampler
            if args.worker == "peft_qlora":
                run_peft(model_dir, args, device, data, meter, summary)
            else:
                run_lightning(args.worker, model_dir, args, device, data, meter, summary)
    except Exception as err:
        write_worker_result(result_path, {"ok": False, "error": describe_exception(err)})
        return 0
    wall = meter.wall or [float("nan")]
    cpu = meter.cpu or [float("nan")]
    result = {
        "ok": True,
        "config": args.worker,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process VmHWM",
        "baseline_mib": base_mib,
        "baseline_anon_mib": base_anon_mib,
        "peak_anon_sampled_mib": meter.anon_peak_mib if device.type == "cpu" else None,
        "setup_peak_mib": meter.setup_peak_mib,
        "train_peak_mib": meter.train_peak_mib,
        "peak_mib": max(x for x in (meter.setup_peak_mib, meter.train_peak_mib) if x is not None),
        "step_s": wall,
        "step_cpu_s": cpu,
        "s_per_step": statistics.median(wall),
        "cpu_s_per_step": statistics.median(cpu),
        "losses": meter.losses,
        "rss_after_step_mib": meter.rss_after_step_mib,
        "anon_after_step_mib": meter.anon_after_step_mib,
        "worker_s": time.perf_counter() - started,
        **summary,
    }
    write_worker_result(result_path, result)
    return 0


# --------------------------------------------------------------------------------------------------------
# Parent: save once, run the configurations, aggregate, write tables and the plot.
# --------------------------------------------------------------------------------------------------------


def aggregate(runs: Mapping[str, list[dict[str, Any]]], tokens_per_step: int) -> list[dict[str, Any]]:
    """Per configuration: fastest median step over repeats, highest peaks; ratios to LoRA."""
    rows: list[dict[str, Any]] = []
    for name, results in runs.items():
        ok = [r for r in results if r.get("ok")]
        if not ok:
            rows.append(
                {"config": name, "error": results[0].get("error", "failed") if results else "not run"}
            )
            continue
        best = min(ok, key=lambda r: r["s_per_step"])
        row: dict[str, Any] = {
            "config": name,
            "label": CONFIG_LABELS[name],
            "repeats": len(ok),
            "baseline_mib": max(r["baseline_mib"] for r in ok),
            "setup_peak_mib": max(r["setup_peak_mib"] for r in ok),
            "train_peak_mib": max(r["train_peak_mib"] for r in ok),
            "peak_mib": max(r["peak_mib"] for r in ok),
            "peak_anon_sampled_mib": max((r.get("peak_anon_sampled_mib") or 0) for r in ok) or None,
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
        }
        rows.append(row)
    reference = next((r for r in rows if r["config"] == REFERENCE and "error" not in r), None)
    if reference is not None:
        for row in rows:
            if "error" in row:
                continue
            for key in (
                "peak_mib",
                "train_peak_mib",
                "peak_anon_sampled_mib",
                "param_mib",
                "s_per_step",
                "cpu_s_per_step",
                "tokens_per_s",
            ):
                if row.get(key) is not None and reference.get(key):
                    row[f"{key}_vs_lora"] = row[key] / reference[key]
    return rows


def build_tables(rows: list[dict[str, Any]], device: str) -> str:
    mem_unit = "GPU MiB" if device == "cuda" else "RSS MiB"
    memory_cols = {
        "config": "configuration",
        "peak_mib": f"peak {mem_unit}",
        "peak_mib_vs_lora": "peak / LoRA",
        "train_peak_mib": f"training peak {mem_unit}",
        "setup_peak_mib": f"load+setup peak {mem_unit}",
        "peak_anon_sampled_mib": "anon. peak MiB",
        "peak_anon_sampled_mib_vs_lora": "anon. peak / LoRA",
        "param_mib": "param MiB",
        "param_mib_vs_lora": "param / LoRA",
        "optimizer_state_mib": "optimizer state MiB",
        "trainable_params": "trainable params",
    }
    if device == "cuda":  # no file-backed pages on a GPU
        memory_cols = {k: v for k, v in memory_cols.items() if not k.startswith("peak_anon")}
    speed_cols = {
        "config": "configuration",
        "s_per_step": "s / step",
        "s_per_step_vs_lora": "s / step / LoRA",
        "tokens_per_s": "tokens / s",
        "tokens_per_s_vs_lora": "tokens / s / LoRA",
        "cpu_s_per_step": "CPU s / step",
        "cpu_s_per_step_vs_lora": "CPU s / step / LoRA",
        "first_loss": "loss step 1",
        "last_loss": "loss last step",
    }
    formats = {
        f"peak {mem_unit}": ".0f",
        f"training peak {mem_unit}": ".0f",
        f"load+setup peak {mem_unit}": ".0f",
        "param MiB": ".1f",
        "anon. peak MiB": ".0f",
        "anon. peak / LoRA": ".2f",
        "optimizer state MiB": ".1f",
        "peak / LoRA": ".2f",
        "training peak / LoRA": ".2f",
        "param / LoRA": ".3f",
        "s / step": ".2f",
        "s / step / LoRA": ".2f",
        "tokens / s": ".1f",
        "tokens / s / LoRA": ".2f",
        "CPU s / step": ".2f",
        "CPU s / step / LoRA": ".2f",
        "loss step 1": ".4f",
        "loss last step": ".4f",
    }

    def render(columns: Mapping[str, str]) -> str:
        table_rows = []
        for row in rows:
            if "error" in row:
                table_rows.append(
                    {"configuration": row["config"], list(columns.values())[1]: f"failed: {row['error']}"}
                )
            else:
                table_rows.append({label: row.get(key) for key, label in columns.items()})
        return markdown_table(table_rows, list(columns.values()), formats)

    return render(memory_cols) + "\n" + render(speed_cols)


def plot_memory(rows: Sequence[Mapping[str, Any]], path: Path, title: str, device: str) -> None:
    """One stacked bar per configuration: what its peak memory is made of, total and ratio to LoRA on top.

    Parameters, gradients and optimizer state are counted from the tensors; the rest of the peak is
    activations, temporaries (dequantized weights) and freed memory the allocator kept.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    labels = [CONFIG_LABELS[r["config"]].replace(" (", "\n(") for r in ok]
    baseline_label = "runtime after imports" if device == "cpu" else "allocated before loading"
    parts: list[tuple[str, str]] = [
        ("baseline", "#b0b0b0"),
        ("parameters (4-bit weights at packed size)", "#4c72b0"),
        ("gradients", "#dd8452"),
        ("optimizer state", "#55a868"),
        ("activations, temporaries, allocator-held free memory", "#f2b6b6"),
    ]
    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=120)
    for j, row in enumerate(ok):
        baseline = row["baseline_mib"] or 0.0
        known = [baseline, row["param_mib"], row["gradient_mib"], row["optimizer_state_mib"]]
        values = [*known, max(0.0, row["peak_mib"] - sum(known))]
        bottom = 0.0
        for (name, color), value in zip(parts, values, strict=True):
            label = (baseline_label if name == "baseline" else name) if j == 0 else None
            ax.bar(j, value / 1024, 0.6, bottom=bottom / 1024, color=color, label=label, edgecolor="white")
            bottom += value
        anon = row.get("peak_anon_sampled_mib")
        if anon:
            label = "anonymous-memory peak (sampled; leaves out pages of the mapped checkpoint)"
            label = label if j == 0 else None
            ax.hlines(
                anon / 1024, j - 0.36, j + 0.36, colors="black", linestyles="--", linewidth=1.3, label=label
            )
        ratio = row.get("peak_mib_vs_lora")
        note = f"{row['peak_mib'] / 1024:.2f} GiB" + (f"\n{ratio:.2f}x LoRA" if ratio is not None else "")
        ax.annotate(
            note,
            (j, row["peak_mib"] / 1024),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_xticks(range(len(ok)), labels, fontsize=9)
    unit = "peak GPU memory allocated" if device == "cuda" else "peak resident memory of the process (VmHWM)"
    ax.set_ylabel(f"GiB, {unit}")
    ax.set_title(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], frameon=False, fontsize=8.5, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results", help="results folder"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="0.5b")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--compute-dtype",
        default=None,
        help="4-bit compute dtype (and the LoRA base dtype on CUDA); "
        "default float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over the configurations (alternating order)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker on CPU (0: torch's default). 1 by default: on a shared, "
        "oversubscribed machine every multi-threaded op waits for a descheduled thread",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="write a torch.profiler table of one extra step after the measured ones",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the saved model here")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per worker")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: <out>/train_memory.png)")
    parser.add_argument("--name", default=NAME, help="results file name (without extension)")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the workers: blocks at least this big are "
        "returned to the OS when freed, so the peak shows live memory rather than freed memory glibc kept "
        "(slower; a diagnostic, not a recommendation)",
    )
    # internal: run one configuration in this process
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compute_dtype is None:
        args.compute_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    script = Path(__file__).resolve()
    hidden, layers, intermediate, vocab = MODEL_SIZES[args.model_size]
    config_kwargs = llama_config_kwargs(hidden, layers, intermediate, vocab)
    common = [
        "--device", args.device, "--compute-dtype", args.compute_dtype, "--threads", str(args.threads),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        common += ["--profile-dir", str(args.profile_dir)]
    started = time.perf_counter()
    tmp_root = None
    if args.model_dir is None:
        tmp_root = Path(tempfile.mkdtemp(prefix="qlora-train-bench-"))
        model_dir = tmp_root / "model"
    else:
        model_dir = args.model_dir
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    extra_env = (
        {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
    )
    try:
        if not (model_dir / "config.json").exists():
            model_dir.mkdir(parents=True, exist_ok=True)
            print(f"saving a random {args.model_size} model to {model_dir} ...", flush=True)
            saved = run_worker(
                script,
                ["--worker", "save", "--model-dir", str(model_dir),
                 "--config-json", json.dumps(config_kwargs), *common],
                args.timeout,
            )  # fmt: skip
            if not saved.get("ok"):
                print(f"saving the model failed: {saved.get('error')}", file=sys.stderr)
                return 1
        failed: set[str] = set()
        for round_index in range(args.repeats):
            order = args.configs if round_index % 2 == 0 else list(reversed(args.configs))
            for name in (n for n in order if n not in failed):
                result = run_worker(
                    script,
                    ["--worker", name, "--model-dir", str(model_dir), *common],
                    args.timeout,
                    extra_env,
                )
                runs[name].append(result)
                if result.get("ok"):
                    brief = (
                        f"{result['s_per_step']:.2f} s/step, peak {result['peak_mib']:.0f} MiB "
                        f"(training {result['train_peak_mib']:.0f}), loss {result['losses'][0]:.3f} -> "
                        f"{result['losses'][-1]:.3f}"
                    )
                else:
                    brief = f"failed: {result.get('error')}"
                    failed.add(name)
                print(f"round {round_index + 1} {name}: {brief}", flush=True)
    finally:
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)

    tokens_per_step = args.seq_len  # batch 1
    rows = aggregate(runs, tokens_per_step)
    params = base_param_count(config_kwargs)
    info = machine_info()
    info["device"] = args.device
    payload = {
        "benchmark": NAME,
        "description": "Training peak memory and step time of full FT, LoRA, QLoRA (package), QLoRA (PEFT); "
        "ratios to LoRA.",
        "config": {
            "model": {"type": "LlamaForCausalLM", "size": args.model_size, **config_kwargs, "params": params},
            "batch": 1,
            "seq_len": args.seq_len,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "compute_dtype": args.compute_dtype,
            "threads": args.threads,
            "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "seed": args.seed,
            "lora": {**LORA, "targets": "every linear layer but lm_head"},
            "optimizer": {
                "lr": LR,
                "full": "torch AdamW",
                "others": "bitsandbytes PagedAdamW (32-bit state)",
            },
            "max_grad_norm": MAX_GRAD_NORM,
            "activation_checkpointing": "every LlamaDecoderLayer, non-reentrant",
            "timing": "median wall time of the timed steps (forward, backward, clip, optimizer step), "
            "fastest repeat",
            "memory": "CPU: worker VmHWM, reset after imports (peak) and at the first step (training peak); "
            "CUDA: max_memory_allocated",
            "configs": {n: CONFIG_LABELS[n] for n in runs},
        },
        "machine": info,
        "results": rows,
        "runs": runs,
        "runtime_s": time.perf_counter() - started,
    }
    header = (
        f"# Training memory and speed, {params / 1e6:.0f} M-parameter Llama-style model\n\n"
        f"{layers} layers, hidden {hidden}, intermediate {intermediate}, vocab {vocab}; batch 1 x "
        f"{args.seq_len} tokens, activation checkpointing on every decoder layer; LoRA r=64, alpha=16, "
        f"dropout 0.1 on every linear layer but lm_head; 4-bit runs NF4 + double quant, compute dtype "
        f"{args.compute_dtype}. device `{args.device}`, torch {info['torch']}, bitsandbytes "
        f"{info['bitsandbytes']}, transformers {info['transformers']}, peft {_version('peft')}, lightning "
        f"{info['lightning']}"
        + (f", {info.get('cuda_device')}" if args.device.startswith("cuda") else
           f", {info['cpu_count']} CPU cores, {args.threads or 'default'} torch thread(s)")
        + f". {args.warmup} warm-up + {args.steps} timed steps, median step, best of {args.repeats}; "
        "ratios are to LoRA. Peak: the worker process's highest resident memory from after its imports "
        "(loading included); training peak: from the first training step on; anon. peak: highest "
        "anonymous (not file-backed) resident memory, sampled every 10 ms, so without the pages of the "
        "memory-mapped safetensors checkpoint that are still mapped. CPU s / step: process CPU time, less "
        "sensitive than wall time to other load on the machine."
        + (f" Workers ran with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}."
           if args.malloc_mmap_threshold else "")
        + "\n\n"
    )  # fmt: skip
    table = build_tables(rows, "cuda" if args.device.startswith("cuda") else "cpu")
    write_results(args.out, args.name, payload, header + table)
    plot_path = args.plot or args.out / ("train_memory.png" if args.name == NAME else f"{args.name}.png")
    plot_memory(
        rows,
        plot_path,
        f"Training memory, {params / 1e6:.0f} M-param Llama-style model, batch 1 x {args.seq_len}, "
        f"{args.device}",
        "cuda" if args.device.startswith("cuda") else "cpu",
    )
    print(header + table, end="")
    stem = args.out / args.name
    print(f"\nwrote {stem}.json, {stem}.md and {plot_path} ({payload['runtime_s']:.0f} s)")
    return 0


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
