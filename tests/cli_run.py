"""The training command in a subprocess, as a user runs it: offline, with no Hydra debug setting inherited."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLI_TESTS = Path(__file__).resolve().parent / "cli"  # on the path: its probes (cli_signals, resume_probe)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env.setdefault("WANDB_SILENT", "true")
    env["PYTHONPATH"] = os.pathsep.join([str(CLI_TESTS), env.get("PYTHONPATH", "")])
    return env


def run_cli(
    args: list[str], cwd: Path, timeout: float = 600, module: str = "lightning_qlora.cli"
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` in `cwd`; the caller checks the return code."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
