"""Where SmolLM2-135M loses quality when its base is stored in NF4 + DQ, before any training.

Why: ``quality_smollm2`` found the untrained validation loss on the skills questions at 2.92 with the fp32
base and 3.42 with NF4 + DQ, a gap fine-tuning never closed. This script locates it. Every layer's 4-bit
weight is produced once by the package's own backend (quantize, then dequantize to fp32: exactly what the
4-bit matmul computes with a float32 compute dtype), and the fp32 model is then evaluated with chosen
subsets of its linear layers swapped to those weights:

- whole model: fp32, NF4 + DQ (blocksize 64, the paper's), NF4 + DQ blocksize 32 (the GGUF's Q4_1 block
  size), FP4 + DQ; each with the relative weight error ||W_q - W|| / ||W||;
- one layer *type* quantized (q/k/v/o/gate/up/down over all 30 decoder layers), and all but one type;
- one decoder layer index quantized (its 7 linears), and all but one index;
- per linear layer, the relative output error ||(W_q - W) x|| / ||W x|| on a calibration batch (the first
  training batch), and its absolute size ||(W_q - W) x|| (what enters the residual stream).

The LM head is tied to the embedding and stays in full precision (the package's default), so it is not
varied. Run: ``python -m benchmarks.quality_cause [--out DIR] [--skip-index]``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from benchmarks.harness import base_parser, machine_info, markdown_table, report_written, write_results
from lightning_qlora.quantization import QuantizationConfig
from lightning_qlora.quantization.layers import dequantize_weight, quantize_layer, to_linear4bit

NAME = "quality_cause"
MODEL = "smollm2-135m-instruct"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMATS = {
    "nf4_dq_64": QuantizationConfig(quant_type="nf4", blocksize=64, double_quant=True),
    "nf4_dq_32": QuantizationConfig(quant_type="nf4", blocksize=32, double_quant=True),
    "fp4_dq_64": QuantizationConfig(quant_type="fp4", blocksize=64, double_quant=True),
}


def load() -> tuple[nn.Module, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The fp32 model, the validation batches and the first training batch of the skills task."""
    from lightning_qlora.tasks.instruction import CausalLMInstructionModule, InstructionDataModule

    module = CausalLMInstructionModule(MODEL, num_samples_to_generate=0)
    data = InstructionDataModule(
        tokenizer_path=MODEL, batch_size=8, max_length=96, seed=42, dataset="skills",
        chat_template=True, eval_batch_size=30,
    )  # fmt: skip
    data.setup()
    model = module.model.eval()
    torch.manual_seed(42)
    return model, list(data.val_dataloader()), next(iter(data.train_dataloader()))


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TYPES
    }


def quantized_weights(layers: dict[str, nn.Linear], config: QuantizationConfig) -> dict[str, torch.Tensor]:
    """Each layer's weight after a round trip through the package's 4-bit storage (fp32 compute)."""
    out = {}
    for name, layer in layers.items():
        copy = nn.Linear(layer.in_features, layer.out_features, bias=False)
        copy.weight.data = layer.weight.data.clone()
        q = to_linear4bit(copy, config, torch.float32)
        quantize_layer(q, "cpu")
        out[name] = dequantize_weight(q, torch.float32)
    return out


@torch.inference_mode()
def val_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """The validation loss as the module logs it (each batch's mean response-token loss, batch-weighted),
    with the LM head applied to the response positions only (the same numbers, a fifth less work)."""
    total = count = 0.0
    for b in batches:
        hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        labels = b["labels"][:, 1:]
        keep = labels != -100
        logits = model.lm_head(hidden[:, :-1][keep]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[keep])
        total += float(loss) * len(b["input_ids"])
        count += len(b["input_ids"])
    return total / count


def evaluate(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    fp32: dict[str, torch.Tensor],
    q: dict[str, torch.Tensor],
    chosen: Iterable[str],
    batches: list[dict[str, torch.Tensor]],
) -> float:
    chosen = set(chosen)
    for name, layer in layers.items():
        layer.weight.data = q[name] if name in chosen else fp32[name]
    try:
        return val_loss(model, batches)
    finally:
        for name, layer in layers.items():
            layer.weight.data = fp32[name]


@torch.no_grad()
def output_errors(
    model: nn.Module, layers: dict[str, nn.Linear], q: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per layer, on the calibration batch's tokens: ||(W_q - W) x||, relative to ||W x|| and absolute."""
    mask = batch["attention_mask"].bool()
    result: dict[str, dict[str, float]] = {}

    def hook(name: str) -> Any:
        def record(mod: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0][mask]
            err = x @ (q[name] - mod.weight).T
            ref = output[mask]
            result[name] = {
                "rel_output_error": float(err.norm() / ref.norm()),
                "abs_output_error": float(err.norm() / x.shape[0] ** 0.5),  # per token (L2)
                "input_rms": float(x.pow(2).mean().sqrt()),
            }

        return record

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return result


def layer_index(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def subset(batches: list[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    """The first `n` validation examples, in batches as they came."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append({k: v[:left] for k, v in b.items()})
        left -= len(b["input_ids"])
    return out


def table_of(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    table = markdown_table(rows, ["group", "quantized", "layers", "val_loss", "delta_vs_fp32"],
                           {"val_loss": ".4f", "delta_vs_fp32": "+.4f"})  # fmt: skip
    if payload.get("weight_rel_error"):
        table += "\n\nRelative weight error ||W_q - W|| / ||W|| over all quantized linears: " + ", ".join(
            f"{k} {v:.4f}" for k, v in payload["weight_rel_error"].items()
        )
    errors = payload.get("output_errors") or {}
    if errors:
        top = sorted(errors.items(), key=lambda kv: -kv[1]["abs_output_error"])[:12]
        table += "\n\nLargest absolute output errors (NF4 + DQ, calibration batch):\n\n" + markdown_table(
            [{"layer": n, **e} for n, e in top],
            ["layer", "abs_output_error", "rel_output_error", "input_rms"],
            {"abs_output_error": ".4f", "rel_output_error": ".4f", "input_rms": ".4f"},
        )
    for key, choice in (payload.get("choices") or {}).items():
        table += (
            f"\n\n{key}: calibration loss {choice['base_loss']:.4f} fp32, {choice['four_bit_loss']:.4f} "
            f"4-bit, {choice['kept_loss']:.4f} kept ({choice['seconds']:.0f} s)"
        )
    for fraction, kept in (payload.get("kept") or {}).items():
        table += f"\n\nkeep_sensitive={fraction}: " + ", ".join(
            f"{k['name']} (+{k['effect']:.4f}, {k['extra_bytes'] / 2**20:.2f} MiB)" for k in kept
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, threads_default=None)
    parser.add_argument(
        "--part",
        choices=("cause", "keep"),
        default="cause",
        help="cause: which layers carry the loss; keep: keep_sensitive's choice and its loss",
    )
    parser.add_argument("--val-examples", type=int, default=60, help="validation examples scored (of 60)")
    parser.add_argument("--calib-examples", type=int, default=8, help="first-batch examples used")
    parser.add_argument("--block", type=int, default=1, help="decoder layers per index group")
    parser.add_argument("--skip-index", action="store_true", help="leave out the per-decoder-layer runs")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(KEEP_METHODS),
        default=list(KEEP_METHODS),
        help="keep part: how layers are ranked and chosen",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, batches, calib = load()
    batches = subset(batches, args.val_examples)
    calib = subset([calib], args.calib_examples)[0]
    layers = linears(model)
    fp32 = {n: m.weight.data.clone() for n, m in layers.items()}
    names = list(layers)
    name = NAME if args.part == "cause" else f"{NAME}_keep"
    payload: dict[str, Any] = {
        "benchmark": name,
        "what": "untrained skills validation loss of SmolLM2-135M with subsets of its linears in 4-bit",
        "model": MODEL,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": [],
        "machine": machine_info(),
    }

    def save() -> None:
        payload["seconds"] = time.perf_counter() - started
        write_results(args.out, name, payload, table_of(payload))

    def run(group: str, label: str, chosen: list[str], qw: dict[str, torch.Tensor]) -> float:
        loss = evaluate(model, layers, fp32, qw, chosen, batches)
        base = payload["rows"][0]["val_loss"] if payload["rows"] else loss
        payload["rows"].append({"group": group, "quantized": label, "layers": len(chosen), "val_loss": loss,
                                "delta_vs_fp32": loss - base})  # fmt: skip
        print(
            f"[cause] {group:>18} {label:>24}: {loss:.4f}  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        save()
        return loss

    q = quantized_weights(layers, FORMATS["nf4_dq_64"])
    run("whole model", "none (fp32)", [], q)
    run("whole model", "nf4_dq_64", names, q)
    if args.part == "keep":
        keep_part(args, model, layers, names, calib, run, payload, save, q)
    else:
        cause_part(args, model, layers, names, fp32, calib, run, payload, save, q)
    save()
    report_written(args.out, name, table_of(payload), time.perf_counter() - started)
    return 0


def cause_part(args: Any, model: nn.Module, layers: dict[str, nn.Linear], names: list[str],
               fp32: dict[str, torch.Tensor], calib: dict[str, torch.Tensor], run: Any,
               payload: dict[str, Any], save: Any, q: dict[str, torch.Tensor]) -> None:  # fmt: skip
    payload["output_errors"] = output_errors(model, layers, q, calib)
    for t in TYPES:
        run("one type", t, [n for n in names if n.endswith(t)], q)
    for t in TYPES:
        run("all but one type", t, [n for n in names if not n.endswith(t)], q)
    weight_error = payload.setdefault("weight_rel_error", {})
    for key in ("nf4_dq_32", "fp4_dq_64", "nf4_dq_64"):
        qw = q if key == "nf4_dq_64" else quantized_weights(layers, FORMATS[key])
        if key != "nf4_dq_64":
            run("whole model", key, names, qw)
        num = sum(float((qw[n] - fp32[n]).pow(2).sum()) for n in names)
        weight_error[key] = (num / sum(float(fp32[n].pow(2).sum()) for n in names)) ** 0.5
    if args.skip_index:
        return
    indices = sorted({layer_index(n) for n in names})
    groups = [indices[i : i + args.block] for i in range(0, len(indices), args.block)]
    for g in groups:
        run("one index group", f"layers {g[0]}-{g[-1]}", [n for n in names if layer_index(n) in g], q)
    for g in groups:
        run("all but one group", f"layers {g[0]}-{g[-1]}", [n for n in names if layer_index(n) not in g], q)


# How keep_sensitive chooses layers: the package's way (each layer's loss rise alone in 4-bit, each addition
# checked on the 4-bit model's calibration loss), and the other ways compared with it.
KEEP_METHODS = {
    "alone_in_4bit_checked": ("full_precision", True, "alone in 4-bit, checked (package)"),
    "alone_in_4bit": ("full_precision", False, "alone in 4-bit (first version)"),
    "kept_alone_checked": ("four_bit", True, "kept alone, checked"),
    "kept_alone": ("four_bit", False, "kept alone"),
}


def keep_part(args: Any, model: nn.Module, layers: dict[str, nn.Linear], names: list[str],
              calib: dict[str, torch.Tensor], run: Any, payload: dict[str, Any], save: Any,
              q: dict[str, torch.Tensor]) -> None:  # fmt: skip
    """keep_sensitive's measurement (package code) on the first training batch, then each budget's loss."""
    from lightning_qlora.quantization.sensitivity import choose_sensitive_layers

    targets = [(n, layers[n]) for n in names]
    payload["kept"] = {}
    payload["choices"] = {}
    measured: dict[str, Any] = {}  # one measurement per context, reused across budgets and checks
    for method in args.methods:
        context, verify, label = KEEP_METHODS[method]
        for fraction in args.fractions:
            started = time.perf_counter()
            choice = choose_sensitive_layers(
                model, targets, QuantizationConfig(keep_sensitive=fraction),
                lambda: val_loss(model, [calib]), context=context, verify=verify,
                measured=measured.get(context),
            )  # fmt: skip
            measured[context] = choice.measured
            key = f"{method} {fraction:g}"
            payload["choices"][key] = {**choice.as_dict(), "seconds": time.perf_counter() - started}
            payload["kept"][key] = [
                {"name": k.name, "effect": k.effect, "extra_bytes": k.extra_bytes} for k in choice.kept
            ]
            extra = choice.extra_bytes / choice.four_bit_model_bytes
            chosen = set(choice.kept_names)
            run(
                f"keep, {label}",
                f"{fraction:g} (+{extra:.1%} bytes)",
                [n for n in names if n not in chosen],
                q,
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if len(sys.argv) > 1 else None))
