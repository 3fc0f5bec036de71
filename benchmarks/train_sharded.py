"""Memory per process and speed of sharded QLoRA ("qlora_fsdp") against one process and DDP.

Why: "qlora_fsdp" exists so that no process has to hold the whole 4-bit model. What it must show is the
4-bit bytes and the peak memory each process keeps, and what the gathers cost in time. Three
configurations train the same random Llama-style model (saved once as safetensors, quantized by
``load_quantized`` while loading) with the package's recipe (NF4 + double quant, LoRA r=64 on every linear
layer but the head, paged AdamW, clipping 0.3, activation checkpointing of every decoder layer), batch 1 x
``--seq-len`` random tokens per process and step:

- ``single``: one process, ``QLoRAStrategy``;
- ``ddp2``: two processes, ``QLoRADDPStrategy`` (each holds the whole 4-bit model);
- ``fsdp2``: two processes, ``QLoRAFSDPStrategy`` (each holds half of every layer; decoder layers are the
  FSDP units).

Every configuration loads the model in ``configure_model``; under ``qlora_fsdp`` with
``load_quantized(shard=self.device_mesh)``, so each rank reads every tensor but keeps only its rows.

Each process is started by this script with torch's rank variables (so Lightning does not relaunch it) and
reports: its 4-bit bytes resident after setup (its shard of the packed weights plus the replicated
statistics), the most packed 4-bit bytes its model held while loading, the packed bytes of one whole
decoder layer (what a gathered unit adds), its RSS before loading (interpreter and libraries), its peak RSS
during setup (loading included) and during training (``VmHWM``, reset between the two), and the median
wall time of a step after the warm-up steps. Two processes do twice the work of one per step (two
rows); ``rows_per_s`` compares throughput. On CPU the two processes share the machine's cores (one thread
each by default).

Run: ``python -m benchmarks.train_sharded [--model-size 0.5b] [--steps 3] [--repeats 1]``
(``--model-size tiny`` for a smoke run). At Llama-2-7B shapes, with the checkpoint ``benchmarks.train_7b``
writes, one configuration per invocation (each takes minutes to load):
``--model-size 7b --model-dir CKPT --steps 1 --warmup 0 --configs fsdp2 [--add-to RESULTS.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    MIB,
    SILENT_TRAINER,
    ProcessMeter,
    StepMeter,
    base_parser,
    build_on_meta,
    interleaved,
    library_warm_up,
    llama_param_count,
    llama_size,
    machine_info,
    markdown_table,
    model_folder,
    report_written,
    save_random_model,
    set_threads,
    write_results,
)

NAME = "train_sharded"
CONFIGS = {"single": 1, "ddp2": 2, "fsdp2": 2}  # name -> processes
LORA = {"r": 64, "alpha": 16, "dropout": 0.1}
LR, MAX_GRAD_NORM = 2e-4, 0.3


# --------------------------------------------------------------------------------------------------------
# Worker: one process of one configuration.
# --------------------------------------------------------------------------------------------------------


def four_bit_bytes(model: Any) -> dict[str, int]:
    """Packed 4-bit bytes this process holds (its shard under FSDP2) and the replicated statistics."""
    import torch

    from lightning_qlora.quantization.layers import is_linear4bit

    packed = stats = 0
    for sub in model.modules():
        if not is_linear4bit(sub):
            continue
        weight = sub.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        packed += local.numel() * local.element_size()
        state = getattr(sub, "quant_state", None) or weight.quant_state
        stats += sum(
            t.numel() * t.element_size()
            for t in state.as_dict(packed=True).values()
            if isinstance(t, torch.Tensor)
        )
    return {"packed_4bit_bytes": packed, "stats_bytes": stats}


def packed_bytes_held(model: Any) -> int:
    """Packed 4-bit bytes this process holds now (layers not loaded yet, still on meta, hold none)."""
    import torch

    from lightning_qlora.quantization.layers import is_linear4bit

    total = 0
    for sub in model.modules():
        weight = getattr(sub, "weight", None)
        if not is_linear4bit(sub) or weight is None or weight.is_meta or weight.dtype != torch.uint8:
            continue
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        total += local.numel() * local.element_size()
    return total


def unit_bytes(model: Any) -> int:
    """Packed 4-bit bytes of the largest decoder layer, whole: what a process holds while FSDP2 has that unit
    gathered (its own rows included), on top of its shards."""
    from lightning_qlora.quantization.layers import is_linear4bit

    layers = model.model.layers
    return max(
        sum(sub.weight.numel() * sub.weight.element_size() for sub in layer.modules() if is_linear4bit(sub))
        for layer in layers
    )


def other_param_bytes(model: Any) -> int:
    """Bytes of the other parameters this process holds (embeddings, norms, head, adapters)."""
    from lightning_qlora.quantization.layers import is_linear4bit

    four_bit = {id(sub.weight) for sub in model.modules() if is_linear4bit(sub)}
    total = 0
    for param in model.parameters():
        if id(param) in four_bit:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def worker_main(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_qlora import (
        LoRA,
        OptimizerConfig,
        QLoRADDPStrategy,
        QLoRAFSDPStrategy,
        QLoRAPrecision,
        QLoRAStrategy,
        load_quantized,
    )
    from lightning_qlora.quantization import QuantizationConfig

    set_threads(args.threads)
    library_warm_up(torch.float32)
    gc.collect()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    processes = CONFIGS[args.worker]
    model_dir = Path(args.model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    total = args.warmup + args.steps
    generator = torch.Generator().manual_seed(args.seed + 1 + rank)
    data = torch.randint(0, vocab, (total, args.seq_len), generator=generator)
    summary: dict[str, Any] = {}

    with ProcessMeter(interval=0.01) as process:
        meter = StepMeter(torch.device("cpu"), args.warmup, total, process)
        common = {
            "optimizer": OptimizerConfig(name="paged_adamw", lr=LR),
            "max_grad_norm": MAX_GRAD_NORM,
            "activation_checkpointing": LlamaDecoderLayer,
        }
        strategy: Any = {
            "single": lambda: QLoRAStrategy(**common),
            "ddp2": lambda: QLoRADDPStrategy(**common),
            "fsdp2": lambda: QLoRAFSDPStrategy(**common),
        }[args.worker]()

        class CausalLM(pl.LightningModule):
            """Loads in `configure_model`: under "qlora_fsdp" each rank reads and keeps only its rows
            (`shard=self.device_mesh`); one process and DDP (no mesh) load the whole model."""

            def __init__(self) -> None:
                super().__init__()
                self.model: Any = None

            def configure_model(self) -> None:
                if self.model is not None:
                    return
                self.model = build_on_meta(LlamaConfig.from_pretrained(model_dir))
                model = self.model

                def count(key: str) -> str:  # called before each tensor is read
                    held = packed_bytes_held(model)
                    summary["load_peak_4bit_bytes"] = max(summary.get("load_peak_4bit_bytes", 0), held)
                    return key

                load_quantized(
                    model,
                    model_dir,
                    QuantizationConfig(compute_dtype=torch.float32),
                    device=torch.device("cpu"),
                    compute_dtype=torch.float32,
                    dtype=torch.float32,
                    key_map=count,
                    shard=self.device_mesh,
                )
                count("")
                summary["unit_4bit_bytes"] = unit_bytes(model)
                model.train()

            def training_step(self, batch: Any, batch_idx: int) -> Any:
                return self.model(input_ids=batch, labels=batch).loss

        class Metered(Callback):
            def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
                summary.update(four_bit_bytes(pl_module.model))
                summary["other_param_bytes"] = other_param_bytes(pl_module.model)
                meter.start_training()

            def on_train_batch_start(self, *args: Any) -> None:
                meter.before_step()

            def on_train_batch_end(
                self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any
            ) -> None:
                meter.after_step(float(outputs["loss"]))

        trainer = pl.Trainer(
            accelerator="cpu",
            devices=processes,
            strategy=strategy,
            plugins=[QLoRAPrecision(compute_dtype="float32", log_report=False)],
            callbacks=[LoRA(**LORA), Metered()],
            max_steps=total,
            **SILENT_TRAINER,
            use_distributed_sampler=False,
        )
        trainer.fit(CausalLM(), DataLoader(data, batch_size=1, shuffle=False))
    result = {"config": args.worker, "rank": rank, "processes": processes, **meter.result(), **summary}
    Path(args.result).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------------
# Parent: save the model once, start each configuration's processes, aggregate.
# --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_config(name: str, model_dir: Path, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    processes = CONFIGS[name]
    port = str(free_port())
    base_env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    launched = []
    for rank in range(processes):
        env = dict(base_env, OMP_NUM_THREADS=str(args.threads))
        if processes > 1:
            env.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(processes))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        result = folder / f"{name}_rank{rank}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.train_sharded", "--worker", name, "--result", str(result)]
        cmd += ["--model-dir", str(model_dir), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--seq-len", str(args.seq_len), "--threads", str(args.threads), "--seed", str(args.seed)]
        launched.append(
            (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), result)
        )
    results = []
    for proc, result in launched:
        output, _ = proc.communicate()
        if proc.returncode != 0 or not result.exists():
            tail = output.decode(errors="replace")[-3000:]
            raise RuntimeError(f"{name} rank failed (exit {proc.returncode}):\n{tail}")
        results.append(json.loads(result.read_text()))
    return results


def summarize(name: str, runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One row: the worst rank's memory, the median over repeats of the slowest rank's s/step."""
    ranks = [r for run in runs for r in run]
    processes = CONFIGS[name]
    step = statistics.median(max(r["s_per_step"] for r in run) for run in runs)
    return {
        "config": name,
        "processes": processes,
        "packed_4bit_mib_per_rank": max(r["packed_4bit_bytes"] for r in ranks) / MIB,
        "stats_mib_per_rank": max(r["stats_bytes"] for r in ranks) / MIB,
        "other_params_mib_per_rank": max(r["other_param_bytes"] for r in ranks) / MIB,
        "load_peak_4bit_mib_per_rank": max(r.get("load_peak_4bit_bytes", 0) for r in ranks) / MIB,
        "unit_4bit_mib": max(r.get("unit_4bit_bytes", 0) for r in ranks) / MIB,
        "baseline_mib_per_rank": max(r["baseline_mib"] or 0 for r in ranks),
        "setup_peak_mib_per_rank": max(r["setup_peak_mib"] for r in ranks),
        "train_peak_mib_per_rank": max(r["train_peak_mib"] for r in ranks),
        "s_per_step": step,
        "rows_per_s": processes / step,
        "cpu_s_per_step": statistics.median(max(r["cpu_s_per_step"] for r in run) for run in runs),
        "s_per_step_all": [r["s_per_step"] for r in ranks],
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, threads_default=1)
    parser.add_argument("--model-size", default="0.5b", help="a name of benchmarks.harness.LLAMA_SIZES")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the saved model here")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (default: the size's); fewer keep every tensor at the size's shapes for a "
        "fraction of the time (the resident bytes then scale with the layers)",
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-from", type=Path, default=None, help="re-tabulate the runs of a results JSON")
    parser.add_argument(
        "--add-to",
        type=Path,
        default=None,
        help="a results JSON of the same settings: keep its runs of the other configurations (a large "
        "model measured one configuration per invocation)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)

    started = time.perf_counter()
    config_kwargs = llama_size(args.model_size)
    if args.layers is not None:
        config_kwargs["num_hidden_layers"] = args.layers
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in args.configs}
    machine = machine_info()
    if args.rows_from is not None:  # the same measurements, tabulated again
        previous = json.loads(args.rows_from.read_text())
        runs, machine = previous["runs"], previous["machine"]
        for key, value in previous["settings"].items():
            setattr(args, key, value)
        args.model_size = previous["model_size"]
        config_kwargs = llama_size(args.model_size)
        if args.layers is not None:
            config_kwargs["num_hidden_layers"] = args.layers
    else:
        with (
            model_folder(args.model_dir, "train_sharded_") as model_dir,
            tempfile.TemporaryDirectory(prefix="train_sharded_ranks_") as rank_files,
        ):
            if not (model_dir / "config.json").exists():
                save_random_model(config_kwargs, "float32", args.seed, model_dir)
            for _, name in interleaved(args.configs, args.repeats):  # a given model folder is only read
                runs[name].append(run_config(name, model_dir, args, Path(rank_files)))
            machine = machine_info()  # the load average at the end
        if args.add_to is not None and args.add_to.exists():
            previous = json.loads(args.add_to.read_text())
            kept = {k: v for k, v in previous["runs"].items() if k not in runs}
            runs = {name: kept.get(name) or runs[name] for name in CONFIGS if name in kept or name in runs}
            machine = {"this_run": machine, "earlier_runs": previous["machine"]}
    rows = [summarize(name, found) for name, found in runs.items()]
    single = next((row for row in rows if row["config"] == "single"), None)
    if single is not None:
        for row in rows:
            row["packed_4bit_vs_single"] = (
                row["packed_4bit_mib_per_rank"] / single["packed_4bit_mib_per_rank"]
            )
            resident = (
                row["packed_4bit_mib_per_rank"] + row["stats_mib_per_rank"] + row["other_params_mib_per_rank"]
            )
            single_resident = (
                single["packed_4bit_mib_per_rank"]
                + single["stats_mib_per_rank"]
                + single["other_params_mib_per_rank"]
            )
            row["resident_weights_vs_single"] = resident / single_resident
            row["train_peak_vs_single"] = row["train_peak_mib_per_rank"] / single["train_peak_mib_per_rank"]
    columns = [
        "config",
        "processes",
        "packed_4bit_mib_per_rank",
        "stats_mib_per_rank",
        "other_params_mib_per_rank",
        "resident_weights_vs_single",
        "load_peak_4bit_mib_per_rank",
        "baseline_mib_per_rank",
        "setup_peak_mib_per_rank",
        "train_peak_mib_per_rank",
        "train_peak_vs_single",
        "s_per_step",
        "rows_per_s",
        "cpu_s_per_step",
    ]
    table = markdown_table(rows, columns)
    payload = {
        "machine": machine,
        "model_size": args.model_size,
        "params": llama_param_count(config_kwargs),
        "layers": config_kwargs["num_hidden_layers"],
        "settings": {
            k: getattr(args, k)
            for k in ("steps", "warmup", "seq_len", "repeats", "threads", "seed", "layers")
        },
        "rows": rows,
        "runs": runs,
    }
    name = NAME if args.model_size == "0.5b" else f"{NAME}_{args.model_size}"
    name += f"_{args.layers}layers" if args.layers is not None else ""
    write_results(args.out, name, payload, table)
    report_written(args.out, name, table, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
