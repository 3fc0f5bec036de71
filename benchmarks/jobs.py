"""How long the README's training commands take, and what they reach, on the machine that runs this.

Each job is the training command as a user types it (`lightning-qlora-train <overrides>`, here
`python -m lightning_qlora.cli.train` in a fresh process, offline), run `--repeats` times, interleaved.
The table gives the wall time of the whole process (imports, model loading, both validations, training,
writing) and its CPU time (user + system, all threads: on a machine shared with other work the wall time
grows with the load, the CPU time much less), the training time alone, the job's metric before and after
tuning, the peak RSS and the compute dtype, with the CPU's relevant features (AVX2, AVX-512, AVX512-BF16,
AMX), which decide the compute dtype and so the speed.

    python -m benchmarks.jobs                                 # default and smoke_tiny_llama, 1 round
    python -m benchmarks.jobs --jobs default --repeats 3
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import base_parser, machine_info, markdown_table, report_written, write_results

JOBS: dict[str, list[str]] = {
    "default": [],
    "smoke_tiny_llama": ["experiment=smoke_tiny_llama"],
    "smollm2_instruct": ["experiment=smollm2_instruct"],
}
FORMATS = {
    "wall_s": ".0f",
    "cpu_s": ".0f",
    "train_s": ".0f",
    "untuned": ".3f",
    "tuned": ".3f",
    "peak_rss_mib": ".0f",
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features() -> dict[str, Any]:
    """The model name and the instruction-set flags that matter here, from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_job(name: str, threads: int | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="lq-job-") as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "lightning_qlora.cli.train", *JOBS[name], f"hydra.run.dir={run_dir}"]
        start, cpu_before = time.perf_counter(), _children_cpu_s()
        proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, check=False)
        wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_before
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
    metric = summary["metric"]
    return {
        "job": name,
        "overrides": " ".join(JOBS[name]) or "(none)",
        "wall_s": wall,
        "cpu_s": cpu,
        "train_s": summary["train"]["time_s"],
        "steps": summary["train"]["steps"],
        "metric": metric["name"],
        "untuned": metric["untuned"],
        "tuned": metric["tuned"],
        "peak_rss_mib": summary["memory"]["peak_rss_mib"],
        "compute_dtype": summary.get("compute_dtype"),
    }


def main() -> None:
    parser = base_parser(__doc__, threads_default=None)
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["default", "smoke_tiny_llama"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for _ in range(args.repeats):
        for name in args.jobs:
            row = run_job(name, args.threads)
            print(row, flush=True)
            rows.append(row)
    info = {**machine_info(), **cpu_features()}
    columns = ["job", "wall_s", "cpu_s", "train_s", "steps", "metric", "untuned", "tuned", "peak_rss_mib"]
    columns.append("compute_dtype")
    flags = ", ".join(info.get("cpu_flags", [])) or "none of " + ", ".join(CPU_FLAGS)
    table = (
        f"Machine: {info.get('cpu_model')} ({flags}), {info['cpu_count']} cores, torch {info['torch']}, "
        f"load average at the end {info.get('loadavg')}.\n\n" + markdown_table(rows, columns, FORMATS)
    )
    write_results(args.out, "jobs", {"machine": info, "jobs": JOBS, "rows": rows}, table)
    report_written(args.out, "jobs", table, time.perf_counter() - started)


if __name__ == "__main__":
    main()
