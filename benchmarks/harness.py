"""The one harness every benchmark script shares: meters, workers, models, machine info, arguments, results.

Why one module: the scripts compare memory and time across configurations, so they must measure them the
same way. Every script imports what it needs from here and keeps only what it compares.

- process meters: peak resident memory (``VmHWM``) reset with ``/proc/self/clear_refs``, and the anonymous
  (``RssAnon``) and file-backed (``RssFile``) parts sampled from a thread, all from ``/proc/self/status``;
  ``ru_maxrss`` cannot be used, because Linux carries the forking parent's peak over ``exec``;
- worker launch: one configuration per fresh interpreter (``python -m benchmarks.<name> --worker ...``),
  so no configuration inherits another's allocator state;
- model factory: Llama-style configs by size, a random checkpoint saved as safetensors, an empty model
  (parameters on the meta device, buffers real) for ``load_quantized``;
- machine info, the common command-line options, and result files written atomically through the
  package's own ``lightning_qlora._atomic``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_qlora._atomic import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
# A benchmark's Trainer: no logger, checkpoints, bars, summary or validation; only the steps it measures.
SILENT_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}

# --------------------------------------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None, without importing it (imports can be slow)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Describe the software and hardware behind a result, so numbers are never read out of context."""
    import torch

    info: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "bitsandbytes": package_version("bitsandbytes"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "lightning": package_version("lightning"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()  # how busy the machine was: timings on a shared one are noisy
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["cuda_device"] = props.name
        info["cuda_device_count"] = torch.cuda.device_count()
        info["cuda_capability"] = f"{props.major}.{props.minor}"
        info["cuda_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


# --------------------------------------------------------------------------------------------------------
# Result tables and files
# --------------------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """Format one table cell: 4 significant digits, scientific only for very small or very large values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude < 1e-3 or magnitude >= 1e6:
            return f"{value:.3e}"
        if magnitude >= 1000:
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
) -> str:
    """Render rows as a GitHub Markdown table; ``formats`` maps a column to a format spec (e.g. ``".3f"``).

    Numeric columns are right-aligned so magnitudes line up when read as plain text.
    """
    formats = dict(formats or {})

    def cell(row: Mapping[str, Any], column: str) -> str:
        value, spec = row.get(column), formats.get(column)
        return format(value, spec) if spec is not None and _is_number(value) else format_value(value)

    cells = [[cell(row, column) for column in columns] for row in rows]
    numeric = [
        all(_is_number(row.get(c)) for row in rows if row.get(c) is not None)
        and any(row.get(c) is not None for row in rows)
        for c in columns
    ]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]

    def render(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if is_num else value.ljust(width)
            for value, width, is_num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if is_num else "-" * w for w, is_num in zip(widths, numeric, strict=True)]
    lines = [render(list(columns)), render(rule), *(render(line) for line in cells)]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, name: str, payload: Mapping[str, Any], table_md: str) -> None:
    """Write ``<name>.json`` (payload) and ``<name>.md`` (table) into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    text = json.dumps(payload, indent=2, sort_keys=False, default=str, allow_nan=True) + "\n"
    md = table_md if table_md.endswith("\n") else table_md + "\n"
    umask = os.umask(0)
    os.umask(umask)
    for path in (
        atomic_write_text(out_dir / f"{name}.json", text),
        atomic_write_text(out_dir / f"{name}.md", md),
    ):
        path.chmod(0o666 & ~umask)  # results are meant to be read by others (honours the umask)


def report_written(out_dir: Path, name: str, table_md: str, seconds: float, *extra: Path) -> None:
    """Print the table and where it went: the last thing every script says."""
    print(table_md, end="" if table_md.endswith("\n") else "\n")
    files = ", ".join(str(p) for p in (out_dir / f"{name}.json", out_dir / f"{name}.md", *extra))
    print(f"\nwrote {files} ({seconds:.0f} s)", flush=True)


def ratios_to(
    rows: Sequence[dict[str, Any]],
    key: str,
    reference: str,
    metrics: Sequence[str],
    suffix: str,
) -> None:
    """Add ``<metric><suffix>`` = row / reference row to every row that has the metric (in place)."""
    ref = next((r for r in rows if r.get(key) == reference and "error" not in r), None)
    if ref is None:
        return
    for row in rows:
        if "error" in row:
            continue
        for metric in metrics:
            if row.get(metric) is not None and ref.get(metric):
                row[f"{metric}{suffix}"] = row[metric] / ref[metric]


# --------------------------------------------------------------------------------------------------------
# Process meters
# --------------------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    """One ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM, RssAnon, ...), or None without procfs."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS, so the peak measured next is only what follows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class AnonPeakSampler:
    """Sample ``RssAnon`` and ``RssFile`` from a thread every `interval` seconds; keep the highest values.

    VmHWM counts the pages of a memory-mapped checkpoint that have been read as resident. The kernel can
    drop those clean file pages under pressure, so the anonymous peak tells how much memory a run really
    needs. Sampling can miss a spike shorter than the interval; treat it as a lower bound.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_anon_kib = 0
        self.peak_file_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        anon, file = proc_status_kib("RssAnon"), proc_status_kib("RssFile")
        self.peak_anon_kib = max(self.peak_anon_kib, anon or 0)
        self.peak_file_kib = max(self.peak_file_kib, file or 0)

    def reset(self) -> None:
        """Start the peaks again from the current values (e.g. when training starts after loading)."""
        self.peak_anon_kib = self.peak_file_kib = 0
        self.sample()

    def __enter__(self) -> AnonPeakSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class ProcessMeter:
    """Peak RSS (VmHWM) with its anonymous and file-backed parts, for one phase of a worker at a time.

    ``start()`` resets the peaks; ``read()`` returns them in MiB (RSS peaks are the kernel's exact VmHWM;
    the anonymous and file-backed peaks are sampled, so a lower bound each).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.sampler = AnonPeakSampler(interval)
        self.base: dict[str, float | None] = {}

    def __enter__(self) -> ProcessMeter:
        self.sampler.__enter__()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sampler.__exit__(*exc)

    def start(self) -> None:
        reset_peak_rss()
        self.sampler.reset()
        self.base = {k: mib(proc_status_kib(k)) for k in ("VmRSS", "RssAnon", "RssFile")}

    def read(self) -> dict[str, float | None]:
        self.sampler.sample()
        return {
            "peak_rss_mib": mib(proc_status_kib("VmHWM")),
            "peak_anon_mib": mib(self.sampler.peak_anon_kib),
            "peak_file_mib": mib(self.sampler.peak_file_kib),
            "rss_mib": mib(proc_status_kib("VmRSS")),
            "base_rss_mib": self.base.get("VmRSS"),
            "base_anon_mib": self.base.get("RssAnon"),
        }


class LikeForLike:
    """Check that a configuration trains as every other does: train mode, checkpointing, dropout.

    Counts the calls of each decoder layer's first norm: with activation checkpointing it runs twice a
    step (forward, and the recomputation in backward) whichever way checkpointing was applied.
    """

    def __init__(self, model: Any) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
        self.calls = 0
        self.per_step: list[float] = []
        for layer in self.layers:
            layer.input_layernorm.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def step_done(self) -> None:
        self.per_step.append(self.calls / max(1, len(self.layers)))
        self.calls = 0

    def state(self) -> dict[str, Any]:
        """Training mode and active dropout now (call during training)."""
        from torch import nn

        dropouts = [m for m in self.model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        return {
            "all_modules_training": all(m.training for m in self.model.modules()),
            "active_dropout_modules": sum(m.training for m in dropouts),
            "dropout_modules": len(dropouts),
        }

    def verify(self, expect_dropout: bool) -> dict[str, Any]:
        """The check's figures; raises if the run was not like for like."""
        found = {**self.state(), "decoder_forwards_per_step": self.per_step}
        problems = []
        if not found["all_modules_training"]:
            problems.append("some modules were in eval mode")
        if any(n != 2 for n in self.per_step):
            problems.append(f"decoder layers ran {self.per_step} times a step, not 2 (checkpointing off?)")
        if expect_dropout and found["active_dropout_modules"] == 0:
            problems.append("no active dropout")
        if problems:
            raise RuntimeError("not like for like: " + "; ".join(problems))
        return found


class StepMeter:
    """Per-step wall and CPU time, losses, and the memory peaks of setup and of training apart."""

    def __init__(self, device: Any, warmup: int, total: int, process: ProcessMeter) -> None:
        self.device, self.warmup, self.total, self.process = (
            device,
            warmup,
            total,
            process,
        )
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []
        self.rss_after_step_mib: list[float | None] = []
        self.anon_after_step_mib: list[float | None] = []
        self.setup: dict[str, float | None] = {}
        self.training: dict[str, float | None] = {}
        self.step = 0
        self._t0 = self._c0 = 0.0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peaks(self) -> dict[str, float | None]:
        import torch

        peaks = self.process.read()
        if self.device.type == "cuda":
            peaks["peak_rss_mib"] = torch.cuda.max_memory_allocated(self.device) / MIB
        return peaks

    def start_training(self) -> None:
        """Called once the model is set up: keeps the peaks so far and starts new ones for training."""
        import torch

        self.setup = self._peaks()
        gc.collect()
        self.process.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def before_step(self) -> None:
        self._sync()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def after_step(self, loss: float) -> None:
        self._sync()
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        self.step += 1
        self.losses.append(loss)
        self.rss_after_step_mib.append(mib(proc_status_kib("VmRSS")))
        self.anon_after_step_mib.append(mib(proc_status_kib("RssAnon")))
        if self.step > self.warmup:
            self.wall.append(wall)
            self.cpu.append(cpu)
        if self.step == self.total:
            self.training = self._peaks()

    def result(self) -> dict[str, Any]:
        def peak(key: str) -> float | None:
            values = [v for v in (self.setup.get(key), self.training.get(key)) if v is not None]
            return max(values) if values else None

        return {
            "baseline_mib": self.setup.get("base_rss_mib"),
            "setup_peak_mib": self.setup.get("peak_rss_mib"),
            "train_peak_mib": self.training.get("peak_rss_mib"),
            "peak_mib": peak("peak_rss_mib"),
            "peak_anon_sampled_mib": peak("peak_anon_mib"),
            "train_peak_anon_mib": self.training.get("peak_anon_mib"),
            "peak_file_sampled_mib": peak("peak_file_mib"),
            "train_peak_file_mib": self.training.get("peak_file_mib"),
            "step_s": self.wall,
            "step_cpu_s": self.cpu,
            "s_per_step": statistics.median(self.wall or [float("nan")]),
            "cpu_s_per_step": statistics.median(self.cpu or [float("nan")]),
            "losses": self.losses,
            "rss_after_step_mib": self.rss_after_step_mib,
            "anon_after_step_mib": self.anon_after_step_mib,
        }


def fit_causal_lm(
    model: Any,
    data: Any,
    meter: StepMeter,
    strategy: Any,
    plugins: Sequence[Any] = (),
    callbacks: Sequence[Any] = (),
    on_start: Any = None,
    on_step: Any = None,
) -> LikeForLike:
    """Train a transformers causal LM one token row per step with a Lightning Trainer, metering each step.

    `on_start(pl_module)` runs once the model is set up (after `callbacks`' own train-start hooks),
    `on_step(trainer)` after every step. Returns the like-for-like probe (call its `verify`).
    """
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    probe: list[LikeForLike] = []

    class CausalLM(pl.LightningModule):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch).loss

    class Metered(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if on_start is not None:
                on_start(pl_module)
            probe.append(LikeForLike(pl_module.model))
            meter.start_training()

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            meter.before_step()

        def on_train_batch_end(
            self,
            trainer: pl.Trainer,
            pl_module: Any,
            outputs: Any,
            batch: Any,
            idx: int,
        ) -> None:
            meter.after_step(float(outputs["loss"]))
            probe[0].step_done()
            if on_step is not None:
                on_step(trainer)

    cuda = meter.device.type == "cuda"
    full_precision = "32-true" if next(model.parameters()).dtype == torch.float32 else "bf16-true"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        strategy=strategy,
        plugins=list(plugins) or None,
        precision=None if plugins else full_precision,
        callbacks=[*callbacks, Metered()],
        max_steps=len(data),
        **SILENT_TRAINER,
    )
    trainer.fit(CausalLM(model), DataLoader(data, batch_size=1, shuffle=False))
    return probe[0]


# --------------------------------------------------------------------------------------------------------
# Worker launch
# --------------------------------------------------------------------------------------------------------


def run_worker(
    module: str,
    worker_args: Sequence[str],
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
    capture: bool = True,
) -> dict[str, Any]:
    """Run ``python -m <module> --worker ...`` in a fresh interpreter; return the JSON it wrote, or why not.

    `module` is the script's ``__name__`` as run (``benchmarks.<name>``); the worker writes its result to
    the path passed as ``--result`` (see `write_worker_result`), and may write it more than once: a worker
    that times out or dies still returns what it wrote last, with ``ok`` False and the reason. With
    ``capture=False`` the worker's output goes to this process's (progress of a long run).
    """
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, *worker_args, "--result", str(result_path)]
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(extra_env or {}),
        }
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                capture_output=capture,
                text=True,
                timeout=timeout,
                env=env,
                cwd=REPO_ROOT,
            )
            failure = f"worker exited with {proc.returncode}"
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:] if capture else []
        except subprocess.TimeoutExpired:
            proc, failure, tail = None, f"timed out after {timeout:.0f} s", []
        result: dict[str, Any] = {"ok": False}
        if result_path.exists():
            result = json.loads(result_path.read_text())
        result["process_wall_s"] = time.perf_counter() - started
        if proc is None or proc.returncode != 0 or not result_path.exists():
            result["ok"] = False
            result["error"] = result.get("error") or ": ".join([failure, " | ".join(tail)]).rstrip(": ")
        return result


def write_worker_result(path: Path | str, result: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, default=str))


def describe_exception(err: BaseException) -> str:
    """The exception's type and message, plus where it was raised (for a refusal worth quoting)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (raised in {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def interleaved(names: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(round, name) over `repeats` rounds, every other round reversed, so drift hits all names alike."""
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else list(reversed(names)):
            yield round_index, name


@contextlib.contextmanager
def model_folder(keep: Path | None, prefix: str) -> Iterator[Path]:
    """`keep` if given (reused and left in place), else a temporary folder removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / "model"


# --------------------------------------------------------------------------------------------------------
# Model factory
# --------------------------------------------------------------------------------------------------------

# name: (hidden, layers, intermediate, vocab, attention heads, key/value heads)
LLAMA_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (128, 2, 352, 1000, 2, 2),
    "small": (512, 8, 1408, 32000, 8, 8),
    "0.1b": (768, 8, 2048, 32000, 12, 12),
    "0.5b": (1024, 24, 4096, 32000, 16, 16),
    "1b": (2048, 16, 5632, 32000, 32, 32),
    "3b": (3200, 26, 8640, 32000, 32, 32),
    "7b": (4096, 32, 11008, 32000, 32, 32),  # Llama-2-7B
}


def llama_config_kwargs(
    hidden: int,
    layers: int,
    intermediate: int,
    vocab: int,
    heads: int | None = None,
    kv_heads: int | None = None,
) -> dict[str, Any]:
    """A Llama-style config (SwiGLU MLP, untied LM head); heads default to hidden / 64, MHA."""
    heads = heads or max(1, hidden // 64)
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }


def llama_size(name: str) -> dict[str, Any]:
    """The config kwargs of a named size in `LLAMA_SIZES`."""
    return llama_config_kwargs(*LLAMA_SIZES[name])


def llama_param_count(config: Mapping[str, Any]) -> int:
    """Parameters of a Llama-style model before adapters (untied head), counted from its config."""
    hidden, inter, vocab = (
        config["hidden_size"],
        config["intermediate_size"],
        config["vocab_size"],
    )
    kv = hidden * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return config["num_hidden_layers"] * per_layer + 2 * vocab * hidden + hidden


def torch_dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


def save_random_model(
    config_kwargs: Mapping[str, Any],
    dtype: str,
    seed: int,
    folder: Path,
    check_tokens: int = 16,
) -> dict[str, Any]:
    """Build the model with seeded random weights and ``save_pretrained`` it as safetensors.

    Also saves the full-precision logits of a fixed input (``reference_logits.pt``), so a loaded 4-bit
    model can be checked against the model it came from.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**config_kwargs)
    model = LlamaForCausalLM(config).to(torch_dtype(dtype)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(check_input_ids(config.vocab_size, check_tokens)).logits.float()
    torch.save(logits, folder / "reference_logits.pt")
    files = sorted(folder.glob("*.safetensors"))
    return {
        "params": params,
        "file_bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
    }


def check_input_ids(vocab: int, tokens: int = 16) -> Any:
    import torch

    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (1, tokens), generator=generator)


def build_on_meta(config: Any) -> Any:
    """A ``LlamaForCausalLM`` built under ``torch.device("meta")``, as the README does: no tensor is ever
    allocated, and ``load_quantized`` recomputes the non-persistent buffers (the rotary ``inv_freq``).

    Not accelerate's ``init_empty_weights``: it creates each parameter on the CPU before moving it to
    meta, which churned through the whole fp32 model (1.9 GB at 0.5B) and, depending on what was left at
    the heap's top, left up to 1.1 GiB of free heap that the training run then filled (seen with
    ``mallinfo2``: the anonymous peak moved by 300 MiB from run to run).
    """
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def library_warm_up(compute_dtype: Any) -> None:
    """Quantize and run one tiny layer, so one-time library set-up (bitsandbytes' op registration, lazy
    torch imports) is neither timed nor counted as memory in any configuration."""
    import torch
    from torch import nn

    from lightning_qlora.quantization import QuantizationConfig, replace_linear_layers

    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    replace_linear_layers(model, QuantizationConfig(exclude=()), compute_dtype=compute_dtype)
    with torch.no_grad():
        model(torch.randn(2, 256))


# --------------------------------------------------------------------------------------------------------
# Command-line options every script shares
# --------------------------------------------------------------------------------------------------------


def base_parser(
    doc: str | None,
    threads_default: int | list[int] | None = 1,
    threads_nargs: str | None = None,
) -> argparse.ArgumentParser:
    """A parser with ``--out`` and ``--threads``; `doc` (the script's docstring) is its description.

    ``threads_nargs="+"`` makes ``--threads`` a list, for scripts that measure at several thread counts.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--threads",
        type=int,
        nargs=threads_nargs,
        default=threads_default,
        help="torch.set_num_threads (0 or unset: torch's default); 1 by default for timings, because on a "
        "shared, oversubscribed machine every multi-threaded op waits for a descheduled thread",
    )
    return parser


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The hidden options a parent passes to the worker it launches with `run_worker`."""
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", default=None, help=argparse.SUPPRESS)


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
