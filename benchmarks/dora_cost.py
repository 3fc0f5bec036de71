"""What DoRA costs over LoRA per training step: seconds and peak memory, on a 4-bit and a 32-bit base.

DoRA adds, per adapted layer and step, the row norms of W + s B A (the base dequantized into the reused
workspace, the update added in place, no gradient) and, with dropout on, the base matmul once more on the
dropped-out input (PEFT's rule). Its extra parameter (one magnitude per output row) is negligible.

The same seeded Llama-style model (``--model-size``, random weights) trains with batch 1 x 256 random
tokens, LoRA r=64, alpha=16, dropout 0.1 (``--lora-dropout``; results then go to ``dora_cost_dropout<p>``)
on every linear layer but the LM head, AdamW lr 2e-4, in a plain loop: ``lora`` / ``dora`` over an NF4 +
double-quant base (QLoRA / QDoRA) and over the 32-bit base. Each configuration runs in a fresh process;
configurations interleave, every other round reversed. Memory is
the worker's peak resident set (``VmHWM``, reset after setup), from /proc/self/status.

Run as ``python -m benchmarks.dora_cost [--model-size small] [--repeats 3] [--steps 8]``.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from benchmarks.harness import (
    ProcessMeter,
    StepMeter,
    add_worker_options,
    base_parser,
    interleaved,
    library_warm_up,
    llama_size,
    machine_info,
    markdown_table,
    report_written,
    run_worker,
    set_threads,
    write_results,
    write_worker_result,
)

NAME = "dora_cost"
CONFIGS = ("qlora", "qdora", "lora32", "dora32")


def worker(config: str, model_size: str, steps: int, warmup: int, dropout: float, result_path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_qlora.lora import LoRAConfig, inject_adapters, set_trainable_params
    from lightning_qlora.quantization import QuantizationConfig, replace_linear_layers

    library_warm_up(torch.float32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_size(model_size)))
    inject_adapters(
        model, LoRAConfig(r=64, alpha=16.0, dropout=dropout, use_dora=config.startswith(("qdora", "dora")))
    )
    set_trainable_params(model)
    if config.startswith("q"):
        replace_linear_layers(model, QuantizationConfig(compute_dtype="float32"), compute_dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (1, 256), generator=g) for _ in range(steps)]
    with ProcessMeter() as process:
        meter = StepMeter(torch.device("cpu"), warmup, steps, process)
        meter.start_training()
        for ids in batches:
            meter.before_step()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            meter.after_step(float(loss))
        result = meter.result()
    result.update(ok=True, config=config, trainable=sum(p.numel() for p in params))
    write_worker_result(result_path, result)


def main() -> None:
    parser = base_parser(__doc__)
    add_worker_options(parser)
    parser.add_argument("--model-size", default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="0 shows DoRA's cost without dropout")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        worker(args.worker, args.model_size, args.steps, args.warmup, args.lora_dropout, args.result)
        return
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    for round_index, name in interleaved(args.configs, args.repeats):
        worker_args = ["--worker", name, "--model-size", args.model_size, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads or 0),
                       "--lora-dropout", str(args.lora_dropout)]  # fmt: skip
        result = run_worker(f"benchmarks.{NAME}", worker_args, timeout=3600)
        progress = {"round": round_index, "config": name, "s_per_step": result.get("s_per_step"),
                    "peak_mib": result.get("train_peak_mib"), "error": result.get("error")}  # fmt: skip
        print(json.dumps(progress), flush=True)
        runs[name].append(result)
    rows = []
    for name, results in runs.items():
        good = [r for r in results if r.get("ok")]
        if not good:
            rows.append({"config": name, "error": results[-1].get("error") if results else "not run"})
            continue
        rows.append({
            "config": name,
            "s_per_step": statistics.median(r["s_per_step"] for r in good),
            "train_peak_mib": statistics.median(r["train_peak_mib"] for r in good),
            "trainable": good[0]["trainable"],
            "runs": len(good),
        })  # fmt: skip
    by_name = {row["config"]: row for row in rows if "error" not in row}
    for dora, lora in (("qdora", "qlora"), ("dora32", "lora32")):
        if dora in by_name and lora in by_name:
            by_name[dora]["step_vs_lora"] = by_name[dora]["s_per_step"] / by_name[lora]["s_per_step"]
            by_name[dora]["peak_vs_lora"] = by_name[dora]["train_peak_mib"] / by_name[lora]["train_peak_mib"]
    columns = ["config", "s_per_step", "step_vs_lora", "train_peak_mib", "peak_vs_lora", "trainable", "runs"]
    formats = {"s_per_step": ".3f", "step_vs_lora": ".2f", "train_peak_mib": ".0f", "peak_vs_lora": ".3f"}
    table = markdown_table(rows, columns, formats)
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}  # no machine paths in results
    payload = {"machine": machine_info(), "args": settings, "rows": rows, "runs": runs}
    name = NAME if args.lora_dropout == 0.1 else f"{NAME}_dropout{args.lora_dropout:g}"
    write_results(args.out, name, payload, table)
    report_written(args.out, name, table, time.perf_counter() - started)


if __name__ == "__main__":
    main()
