"""Useful (non-padding) tokens per second: packed rows against padded, length-grouped batches.

Why: packing (``data.packing=true``) exists to stop spending compute on padding. With the package's
length-grouped batches the padding is already small, so the question is what packing still buys, and
whether its block-diagonal attention over longer rows costs more than it saves. Both configurations see
the same examples in every step (the same ``batch_size`` examples, drawn by the same length-grouped
sampler; only the collation differs: one padded row per example, or as few packed rows of
``max_length`` tokens as first-fit decreasing finds).

Per dataset, one fresh process trains SmolLM2-135M-Instruct the way the ``smollm2_instruct`` experiment
does (NF4 + double quantization, LoRA r=8 on every linear layer but the head, paged AdamW, the chunked
token-mean loss; the data config's ``max_length`` and chat-template setting) on a sequence of steps in
which padded and packed batches of the same examples alternate, the order reversed every other pair
(ABBA), so a change of the machine's load hits both alike; the first pair is a warm-up. Reported: each
configuration's median useful tokens per second with its range, and the per-pair ratio packed / padded.
Beside it, deterministic figures over the whole first epoch: the share of the batch's token slots that
hold real tokens, padded (random or length-grouped batches) and packed.

Run: ``python -m benchmarks.packing_speed [--datasets skills alpaca] [--pairs 4] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.harness import (
    SILENT_TRAINER,
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

NAME = "packing_speed"
DATASETS = ("skills", "alpaca")
MODEL = "smollm2-135m-instruct"
MODES = ("padded", "packed")


def data_settings(dataset: str) -> dict[str, Any]:
    """The packaged data config's settings for ``dataset`` (conf/data/<dataset>.yaml, as the command runs)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf" / "data"
    merged = OmegaConf.merge(OmegaConf.load(conf / "alpaca.yaml"), OmegaConf.load(conf / f"{dataset}.yaml"))
    keys = ("batch_size", "max_length", "chat_template")
    return {k: merged[k] for k in keys}


def datamodule(dataset: str, **overrides: Any) -> Any:
    from lightning_qlora.tasks import InstructionDataModule

    settings = {**data_settings(dataset), **overrides}
    return InstructionDataModule(dataset=dataset, tokenizer_path=MODEL, seed=42, **settings)


def epoch_efficiency(dataset: str) -> dict[str, float]:
    """Real tokens / token slots over the first epoch's training batches, per way of batching."""
    out = {}
    for label, grouped, packing in (
        ("padded, random batches", False, False),
        ("padded, length-grouped", True, False),
        ("packed, length-grouped", True, True),
    ):
        report = datamodule(dataset, group_by_length=grouped, packing=packing).data_report()
        out[label] = float(report["token_efficiency"])
    return out


def spaced(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all of them if there are fewer)."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def worker_main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy
    from lightning_qlora.tasks import CausalLMInstructionModule

    result: dict[str, Any] = {"dataset": args.worker, "ok": False}
    try:
        dm = datamodule(args.worker, group_by_length=True, packing=False)
        dm.setup()
        train = dm.datasets["train"]
        chosen = spaced(dm.train_batches(), args.pairs + 1)
        steps: list[tuple[str, dict[str, torch.Tensor]]] = []
        for pair, indices in enumerate(chosen):
            features = [train[i] for i in indices]
            both = [("padded", dm.collate(features)), ("packed", dm.collate_packed(features))]
            steps += both if pair % 2 == 0 else both[::-1]
        records: list[dict[str, Any]] = []

        class Timed(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_train_batch_end(
                self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
            ) -> None:
                wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
                mode, data = steps[i]
                records.append(
                    {
                        "step": i,
                        "pair": i // 2,
                        "mode": mode,
                        "examples": len(chosen[i // 2]),
                        "rows": int(data["input_ids"].size(0)),
                        "width": int(data["input_ids"].size(1)),
                        "real_tokens": int(data["attention_mask"].sum()),
                        "slots": int(data["input_ids"].numel()),
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "loss": pl_module.last_step_loss,
                    }
                )

        module = CausalLMInstructionModule(pretrained_path=MODEL, num_samples_to_generate=0)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            plugins=[QLoRAPrecision()],
            callbacks=[LoRA(r=8, alpha=16, dropout=0.05, export_dir=None), Timed()],
            strategy=QLoRAStrategy(optimizer={"lr": 1e-3}),
            max_steps=len(steps),
            **SILENT_TRAINER,
        )
        loader = torch.utils.data.DataLoader([batch for _, batch in steps], batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
        result.update(ok=True, settings=data_settings(args.worker), steps=records)
    except Exception as err:
        result["error"] = describe_exception(err)
    write_worker_result(args.result, result)
    return 0 if result["ok"] else 1


def summarize(
    dataset: str, runs: Sequence[Mapping[str, Any]], efficiency: Mapping[str, float]
) -> dict[str, Any]:
    """One table row: the timed pairs of every run of ``dataset`` (the warm-up pair left out)."""
    timed = [s for r in runs if r.get("ok") for s in r["steps"] if s["pair"] > 0]
    rate: dict[str, list[float]] = {m: [] for m in MODES}
    cpu_rate: dict[str, list[float]] = {m: [] for m in MODES}
    slots: dict[str, list[int]] = {m: [] for m in MODES}
    for s in timed:
        rate[s["mode"]].append(s["real_tokens"] / s["wall_s"])
        cpu_rate[s["mode"]].append(s["real_tokens"] / s["cpu_s"])
        slots[s["mode"]].append(s["slots"])
    pairs: dict[tuple[int, int], dict[str, tuple[float, float]]] = {}
    for run_index, r in enumerate(runs):
        for s in r.get("steps", []) if r.get("ok") else []:
            if s["pair"] > 0:
                speeds = (s["real_tokens"] / s["wall_s"], s["real_tokens"] / s["cpu_s"])
                pairs.setdefault((run_index, s["pair"]), {})[s["mode"]] = speeds
    both = [p for p in pairs.values() if len(p) == 2]
    ratios = [p["packed"][0] / p["padded"][0] for p in both]
    cpu_ratios = [p["packed"][1] / p["padded"][1] for p in both]

    def median_range(values: Sequence[float], digits: int = 0) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"

    settings = next((r["settings"] for r in runs if r.get("ok")), {})
    return {
        "dataset": dataset,
        "batch / max_length": f"{settings.get('batch_size')} / {settings.get('max_length')}",
        "timed pairs": len(ratios),
        "padded useful tok/s": median_range(rate["padded"]),
        "packed useful tok/s": median_range(rate["packed"]),
        "packed / padded": median_range(ratios, 2),
        "padded useful tok / CPU s": median_range(cpu_rate["padded"]),
        "packed useful tok / CPU s": median_range(cpu_rate["packed"]),
        "packed / padded, CPU": median_range(cpu_ratios, 2),
        "slots / step padded": statistics.mean(slots["padded"]) if slots["padded"] else None,
        "slots / step packed": statistics.mean(slots["packed"]) if slots["packed"] else None,
        **{f"real share, {k}": v for k, v in efficiency.items()},
        "error": "; ".join(r["error"] for r in runs if r.get("error")) or None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--pairs", type=int, default=4, help="timed (padded, packed) pairs per run")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per dataset")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from <name>.json")
    add_worker_options(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)
    set_threads(args.threads)
    started = time.perf_counter()
    efficiency = {d: epoch_efficiency(d) for d in args.datasets}
    runs: dict[str, list[dict[str, Any]]] = {d: [] for d in args.datasets}
    table = ""
    if args.table_only:
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        runs = {d: saved["runs"][d] for d in args.datasets}
        table = write_table(args, runs, efficiency, saved["machine"])
    for round_index in range(0 if args.table_only else args.repeats):
        order = args.datasets if round_index % 2 == 0 else list(reversed(args.datasets))
        for dataset in order:
            print(f"{dataset}, round {round_index + 1} ...", flush=True)
            cmd = ["--worker", dataset, "--pairs", str(args.pairs), "--threads", str(args.threads or 0)]
            runs[dataset].append(run_worker(__spec__.name, cmd, args.timeout))
            table = write_table(args, runs, efficiency, machine_info())
    report_written(args.out, args.name, table, time.perf_counter() - started)
    return 0


def write_table(
    args: argparse.Namespace,
    runs: Mapping[str, list[dict[str, Any]]],
    efficiency: Mapping[str, Mapping[str, float]],
    info: Mapping[str, Any],
) -> str:
    """The table of the runs so far, written with the runs to ``<out>/<name>.{md,json}``."""
    rows = [summarize(d, runs[d], efficiency[d]) for d in args.datasets if runs[d]]
    table = (
        "# Useful tokens per second, packed against padded (length-grouped) batches\n\n"
        f"SmolLM2-135M-Instruct, QLoRA (NF4 + DQ, LoRA r=8), CPU, {args.threads} thread(s); the same "
        "examples per step in both configurations; median [min, max] over the timed pairs, per wall "
        "second and per CPU second of the (single-threaded) process; real share: real tokens / token "
        "slots of the whole first epoch's training batches (deterministic). Load average at the end: "
        f"{info.get('loadavg')}: a shared, loaded machine, so the wall-clock rates are noisy; the CPU-time "
        "rates of one thread depend far less on the load.\n\n" + markdown_table(rows, list(rows[0]))
    )
    write_results(args.out, args.name, {"machine": info, "args": vars_of(args), "runs": runs}, table)
    return table


def vars_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) for k, v in vars(args).items() if k not in ("out", "result", "config_json")}


if __name__ == "__main__":
    sys.exit(main())
