"""The headline: QLoRA-train a 7B Llama-architecture model on a 2-core, 24 GiB CPU machine.

Why: QLoRA's claim is that a model too big to fine-tune in 16/32 bits fits once its frozen weights are
stored in 4 bits. This script checks it end to end, at Llama-2-7B's shapes (32 layers, hidden 4096,
intermediate 11008, vocab 32000; 6.74 B parameters), with random weights:

1. write: a bf16 safetensors checkpoint, one shard per decoder layer (plus one for the embeddings, norm
   and head), each tensor generated, written and freed before the next, so writing it fits in memory too;
2. load: ``load_quantized`` into a model whose parameters are on the meta device (NF4 + double quant, one
   tensor at a time), in a fresh process;
3. train: ``--steps`` Lightning steps at batch 1 x 256 with ``QLoRAPrecision``, ``LoRA`` (r=64, alpha=16,
   dropout 0.1, every linear layer but the head) and ``QLoRAStrategy`` (paged AdamW, activation
   checkpointing on every decoder layer; checked: each layer runs twice a step, every module in train
   mode).

It reports the load time, seconds per step and the process's peak RSS (VmHWM) with its anonymous and
file-backed parts, then deletes the checkpoint. Smaller shapes (``--size 0.1b``, ``1b``, ``3b``) check the
script quickly or find the largest size that fits.

Run: ``python -m benchmarks.train_7b [--size 7b] [--steps 2] [--threads 2] [--dir FOLDER]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    LLAMA_SIZES,
    MIB,
    ProcessMeter,
    StepMeter,
    add_worker_options,
    base_parser,
    build_on_meta,
    describe_exception,
    fit_causal_lm,
    library_warm_up,
    llama_param_count,
    llama_size,
    machine_info,
    markdown_table,
    model_folder,
    report_written,
    run_worker,
    set_threads,
    write_results,
    write_worker_result,
)

NAME = "train_7b"
LORA = {"r": 64, "alpha": 16.0, "dropout": 0.1}
GIB = 2**30

# --------------------------------------------------------------------------------------------------------
# Worker "write": the checkpoint, tensor by tensor.
# --------------------------------------------------------------------------------------------------------


def checkpoint_shapes(
    config: Mapping[str, Any],
) -> Iterator[tuple[str, dict[str, tuple[int, ...]]]]:
    """(shard name, {tensor name: shape}) of a ``LlamaForCausalLM`` state dict, one shard per layer."""
    hidden, inter, vocab = (
        config["hidden_size"],
        config["intermediate_size"],
        config["vocab_size"],
    )
    kv = hidden * config["num_key_value_heads"] // config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    yield "embeddings", {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        yield (
            f"layer-{i:03d}",
            {
                prefix + "self_attn.q_proj.weight": (hidden, hidden),
                prefix + "self_attn.k_proj.weight": (kv, hidden),
                prefix + "self_attn.v_proj.weight": (kv, hidden),
                prefix + "self_attn.o_proj.weight": (hidden, hidden),
                prefix + "mlp.gate_proj.weight": (inter, hidden),
                prefix + "mlp.up_proj.weight": (inter, hidden),
                prefix + "mlp.down_proj.weight": (hidden, inter),
                prefix + "input_layernorm.weight": (hidden,),
                prefix + "post_attention_layernorm.weight": (hidden,),
            },
        )
    yield "head", {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def write_checkpoint(config: Mapping[str, Any], folder: Path, seed: int) -> dict[str, Any]:
    """Random bf16 weights (N(0, 0.02), norms 1) written shard by shard, with config and index files."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**config).save_pretrained(folder)
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    for shard, shapes in checkpoint_shapes(config):
        tensors = {}
        for name, shape in shapes.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        filename = f"model-{shard}.safetensors"
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {
        "checkpoint_bytes": total,
        "shards": len(set(weight_map.values())),
        "write_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------------
# Worker "train": load into 4 bits, then train.
# --------------------------------------------------------------------------------------------------------


def load(folder: Path, compute_dtype: str) -> tuple[Any, float]:
    """``load_quantized`` into an empty model (NF4 + double quant; kept weights in fp32)."""
    import torch
    from transformers import LlamaConfig

    from lightning_qlora import QuantizationConfig, load_quantized

    started = time.perf_counter()
    model = build_on_meta(LlamaConfig.from_pretrained(folder))
    load_quantized(
        model,
        folder,
        QuantizationConfig(compute_dtype=compute_dtype),
        dtype=torch.float32,
    )
    return model.train(), time.perf_counter() - started


def train(
    model: Any,
    args: argparse.Namespace,
    meter: StepMeter,
    out: dict[str, Any],
    save: Any,
) -> None:
    """`args.steps` steps of a Lightning Trainer with the package's three pieces; `save` after each step."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy, quantization_report

    def on_start(pl_module: Any) -> None:
        trainable = [p for p in pl_module.model.parameters() if p.requires_grad]
        out["param_mib"] = quantization_report(pl_module.model).total_bytes / MIB
        out["trainable_params"] = sum(p.numel() for p in trainable)
        save()

    def on_step(trainer: Any) -> None:
        print(f"step {meter.step}: {meter.wall[-1]:.0f} s", flush=True)
        save()

    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, model.config.vocab_size, (args.steps, args.seq_len), generator=generator)
    probe = fit_causal_lm(
        model,
        data,
        meter,
        QLoRAStrategy(activation_checkpointing=LlamaDecoderLayer),
        [QLoRAPrecision(compute_dtype=args.compute_dtype, log_report=False)],
        [LoRA(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"])],
        on_start=on_start,
        on_step=on_step,
    )
    out["like_for_like"] = probe.verify(expect_dropout=True)


def worker_train(args: argparse.Namespace) -> dict[str, Any]:
    """Load and train, writing what is known so far after every phase (a long run may be cut short)."""
    import torch

    out: dict[str, Any] = {"ok": False, "stage": "load"}
    with ProcessMeter(interval=0.05) as process:
        meter = StepMeter(torch.device("cpu"), warmup=0, total=args.steps, process=process)

        def save() -> None:
            write_worker_result(args.result, {**out, **meter.result(), "setup": meter.setup})

        model, out["load_s"] = load(Path(args.dir), args.compute_dtype)
        out["stage"] = "train"
        print(f"loaded in {out['load_s']:.0f} s", flush=True)
        train(model, args, meter, out, save)
    out.update(ok=True, stage="done")
    return {**out, **meter.result(), "setup": meter.setup}


def worker_main(args: argparse.Namespace) -> int:
    import torch

    set_threads(args.threads)
    try:
        if args.worker == "write":
            result = {
                "ok": True,
                **write_checkpoint(json.loads(args.config_json), Path(args.dir), args.seed),
            }
        else:
            library_warm_up(torch.float32)
            result = worker_train(args)
    except Exception as err:
        previous = json.loads(Path(args.result).read_text()) if Path(args.result).exists() else {}
        result = {**previous, "ok": False, "error": describe_exception(err)}
    write_worker_result(args.result, result)
    return 0


# --------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, threads_default=2)
    parser.add_argument(
        "--size",
        choices=list(LLAMA_SIZES),
        default="7b",
        help="Llama shape (default 7b)",
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--compute-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="of the 4-bit matmuls (default: the package's auto, bf16 on CPUs with native bf16)",
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="checkpoint folder (default: a temporary one)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (default: delete it)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per worker")
    parser.add_argument(
        "--name",
        default=None,
        help="results file name (default: train_7b, or train_<size>)",
    )
    add_worker_options(parser)
    args = parser.parse_args(argv)
    args.name = args.name or (NAME if args.size == "7b" else f"train_{args.size.replace('.', '_')}")
    return args


def check_disk(folder: Path, needed: int) -> None:
    """Refuse before writing anything when the checkpoint cannot fit on the disk."""
    probe = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if free < needed * 1.05:
        raise SystemExit(
            f"the checkpoint needs {needed / GIB:.1f} GiB and {probe} has {free / GIB:.1f} GiB free; "
            "pass --dir on a larger disk or a smaller --size"
        )


def describe(args: argparse.Namespace, config: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    params = llama_param_count(config)
    return (
        f"# QLoRA training of a {params / 1e9:.2f} B-parameter Llama ({args.size} shapes) on CPU\n\n"
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, intermediate "
        f"{config['intermediate_size']}, vocab {config['vocab_size']}; random bf16 safetensors checkpoint "
        "written shard by shard, `load_quantized` into NF4 + double quant (compute dtype "
        f"{args.compute_dtype}; embeddings, norms and head kept in fp32), then {args.steps} steps at "
        f"batch 1 x {args.seq_len}, LoRA r=64 on every "
        "linear layer but the head, dropout 0.1, paged AdamW, activation checkpointing on every decoder "
        "layer "
        f"(checked). {info['cpu_count']} CPU cores, {args.threads} torch threads, torch {info['torch']}, "
        f"bitsandbytes {info['bitsandbytes']}; load average at the end {info.get('loadavg')}. Peak RSS: "
        "VmHWM of the training process (loading included); anonymous / file-backed: RssAnon / RssFile "
        "sampled every 50 ms (file-backed pages are the mapped checkpoint, which the kernel can drop).\n\n"
    )


def table(result: Mapping[str, Any], written: Mapping[str, Any]) -> str:
    row = {
        "checkpoint GiB": written.get("checkpoint_bytes", 0) / GIB,
        "write s": written.get("write_s"),
        "load s": result.get("load_s"),
        "s / step": result.get("s_per_step"),
        "each step s": ", ".join(f"{s:.0f}" for s in result.get("step_s", [])),
        "CPU s / step": result.get("cpu_s_per_step"),
        "peak RSS GiB": (result.get("peak_mib") or 0) / 1024,
        "anon. peak GiB": (result.get("peak_anon_sampled_mib") or 0) / 1024,
        "file-backed peak GiB": (result.get("peak_file_sampled_mib") or 0) / 1024,
        "load peak GiB": (result.get("setup_peak_mib") or 0) / 1024,
        "param MiB": result.get("param_mib"),
        "losses": ", ".join(f"{v:.3f}" for v in result.get("losses", [])),
        "status": "ok" if result.get("ok") else f"failed: {result.get('error')}",
    }
    seconds = {k: ".0f" for k in ("write s", "load s", "s / step", "CPU s / step", "param MiB")}
    return markdown_table([row], list(row), {k: ".2f" for k in row if k.endswith("GiB")} | seconds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    config = llama_size(args.size)
    started = time.perf_counter()
    common = [
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
        "--compute-dtype",
        args.compute_dtype,
    ]
    with model_folder(args.dir, "qlora-7b-") as folder:
        try:
            check_disk(folder, 2 * llama_param_count(config))
            cmd = [
                "--worker",
                "write",
                "--dir",
                str(folder),
                "--config-json",
                json.dumps(config),
                "--seed",
                str(args.seed),
            ]
            written = run_worker(__spec__.name, [*cmd, *common], args.timeout, capture=False)
            print(f"checkpoint: {written}", flush=True)
            result = written
            if written.get("ok"):
                cmd = ["--worker", "train", "--dir", str(folder)]
                result = run_worker(__spec__.name, [*cmd, *common], args.timeout, capture=False)
        finally:
            if args.dir is not None and not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    info = machine_info()
    payload = {
        "benchmark": args.name,
        "description": "QLoRA training of a Llama-architecture model from a bf16 checkpoint on CPU",
        "config": {"size": args.size, "model": config, "params": llama_param_count(config), "lora": LORA,
                   **{k: getattr(args, k) for k in ("steps", "seq_len", "threads", "seed")}},
        "machine": info,
        "checkpoint": written,
        "result": result,
        "runtime_s": time.perf_counter() - started,
    }  # fmt: skip
    text = describe(args, config, info) + table(result, written)
    write_results(args.out, args.name, payload, text)
    report_written(args.out, args.name, text, payload["runtime_s"])
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
