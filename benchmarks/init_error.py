"""How far the adapted 4-bit model starts from the full-precision one: plain LoRA init vs LoftQ.

QLoRA's adapters start at zero (B = 0), so training starts from the 4-bit model and its quantization
error. LoftQ starts A and B from the residual W - Q(W) (and, after more rounds, Q from W - L R). This
measures, on real weights, the relative output error of the adapted 4-bit model against the
full-precision model before any training:

    ||out_4bit+adapters - out_fp|| / ||out_fp||     over the packaged validation texts

- MiniLM (the packaged all-MiniLM-L6-v2): the last hidden state over the sentiment validation texts;
- SmolLM2-135M-Instruct (if `lightning_qlora.pretrained.smollm2` and its GGUF are installed): the logits
  over the alpaca validation prompts.

NF4 + double quantization, blocksize 64, float32 compute, every linear layer but the LM head; ranks 16
and 64 (the paper's). Deterministic: one run per cell. Time is LoftQ's at injection (1 thread, noisy
shared machine). Run as ``python -m benchmarks.init_error``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    base_parser,
    machine_info,
    markdown_table,
    report_written,
    set_threads,
    write_results,
)

NAME = "init_error"
DATA = Path(__file__).resolve().parent.parent / "lightning_qlora" / "tasks" / "data"


def _texts(task: str, field: str, limit: int) -> list[str]:
    lines = (DATA / task / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)[field] for line in lines if line.strip()][:limit]


def _minilm() -> tuple[Any, Callable[[Any], Any]]:
    from transformers import AutoModel, AutoTokenizer

    from lightning_qlora.tasks.classification import default_pretrained_path

    folder = default_pretrained_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(_texts("sentiment", "text", 32), padding=True, truncation=True, max_length=64,
                      return_tensors="pt")  # fmt: skip
    mask = batch["attention_mask"].unsqueeze(-1).bool()

    def outputs(model: Any) -> Any:
        return model(**batch).last_hidden_state.masked_select(mask)

    return AutoModel.from_pretrained(folder).eval(), outputs


def _smollm2() -> tuple[Any, Callable[[Any], Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_qlora.pretrained.smollm2 import smollm2_instruct_path

    folder = smollm2_instruct_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(_texts("alpaca", "instruction", 16), padding=True, truncation=True, max_length=48,
                      return_tensors="pt")  # fmt: skip
    mask = batch["attention_mask"].unsqueeze(-1).bool()

    def outputs(model: Any) -> Any:
        return model(**batch).logits.masked_select(mask)

    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval(), outputs


MODELS: dict[str, Callable[[], tuple[Any, Callable[[Any], Any]]]] = {"minilm": _minilm, "smollm2": _smollm2}


def measure(model_name: str, ranks: list[int], rounds: list[int]) -> list[dict[str, Any]]:
    import torch

    from lightning_qlora.lora import LoRAConfig, inject_adapters
    from lightning_qlora.quantization import QuantizationConfig, replace_linear_layers

    full, outputs = MODELS[model_name]()
    nf4 = QuantizationConfig(compute_dtype="float32")
    with torch.no_grad():
        reference = outputs(full)
    rows: list[dict[str, Any]] = []
    for r in ranks:
        for init, n in [("default", 1)] + [("loftq", n) for n in rounds]:
            model = copy.deepcopy(full)
            started = time.perf_counter()
            config = LoRAConfig(r=r, alpha=16.0, dropout=0.0, init=init, loftq_iter=n)
            inject_adapters(model, config, quantization=nf4)
            seconds = time.perf_counter() - started
            replace_linear_layers(model, nf4, compute_dtype=torch.float32)
            with torch.no_grad():
                got = outputs(model.eval())
            error = float((got - reference).norm() / reference.norm())
            label = "plain" if init == "default" else f"loftq x{n}"
            rows.append({"model": model_name, "r": r, "init": label, "rel_output_error": error,
                         "init_s": seconds if init == "loftq" else None})  # fmt: skip
            print(rows[-1], flush=True)
            del model
        plain = next(
            row for row in rows if row["r"] == r and row["init"] == "plain" and row["model"] == model_name
        )
        for row in rows:
            if row["r"] == r and row["model"] == model_name:
                row["vs_plain"] = row["rel_output_error"] / plain["rel_output_error"]
    return rows


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=sorted(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--rounds", nargs="+", type=int, default=[1, 2, 4])
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for model_name in args.models:
        try:
            rows += measure(model_name, args.ranks, args.rounds)
        except (ImportError, FileNotFoundError, OSError) as err:  # SmolLM2 is optional
            skipped[model_name] = f"{type(err).__name__}: {err}"
            print(f"skipped {model_name}: {skipped[model_name]}", flush=True)
    columns = ["model", "r", "init", "rel_output_error", "vs_plain", "init_s"]
    table = markdown_table(rows, columns, {"rel_output_error": ".4f", "vs_plain": ".3f", "init_s": ".1f"})
    if skipped:
        table += "\n" + "\n".join(f"Skipped {name}: {why}" for name, why in skipped.items()) + "\n"
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}  # no machine paths in results
    payload = {"machine": machine_info(), "args": settings, "rows": rows, "skipped": skipped}
    write_results(args.out, NAME, payload, table)
    report_written(args.out, NAME, table, time.perf_counter() - started)


if __name__ == "__main__":
    main()
