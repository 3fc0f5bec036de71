"""The built wheel, installed into a fresh virtual environment, works from a folder outside the checkout.

This is what a `pip install lightning-qlora` user gets: the command finds its packaged `conf/` and data
without the repository. Nothing is downloaded: the wheel is built here (hatchling, the build backend of
pyproject.toml), installed with `--no-index --no-deps`, and the new environment reuses this one's
installed dependencies (torch, Lightning, transformers, ...) through a `.pth` file listing this
environment's site-packages, so only the package itself comes from the wheel.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import lightning_qlora

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )


def _clean_env() -> dict[str, str]:
    """A user's environment: no PYTHONPATH pointing into the checkout, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _build_wheel(out: Path) -> Path:
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (the [dev] extra has it)")
    build = [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", out]
    proc = _run(build, ROOT, dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("lightning_qlora-*.whl")
    return wheel


def _fresh_venv(folder: Path) -> Path:
    """A venv without pip whose Python also sees this environment's site-packages (after its own)."""
    proc = _run([sys.executable, "-m", "venv", "--without-pip", folder], folder.parent, _clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    python = folder / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    where = _run([python, "-c", code], folder, _clean_env())
    shared = dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib")])  # ordered, no repeats
    Path(where.stdout.strip(), "_shared_site_packages.pth").write_text("\n".join(shared) + "\n")
    return python


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_command_outside_the_checkout(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    python = _fresh_venv(tmp_path / "venv")
    env = _clean_env()
    install = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed", wheel]
    proc = _run(install, tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run([python, "-c", "import lightning_qlora; print(lightning_qlora.__file__)"], elsewhere, env)
    installed_at = Path(proc.stdout.strip())
    assert installed_at.is_relative_to(tmp_path / "venv"), f"imported from {installed_at}, not the wheel"

    command = tmp_path / "venv" / "bin" / "lightning-qlora-train"
    proc = _run([command, "--help"], elsewhere, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"lightning-qlora-train {lightning_qlora.__version__}" in proc.stdout
    packaged = sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert f"experiment: {', '.join(packaged)}" in proc.stdout  # the wheel carries every experiment

    job = [command, "trainer.max_steps=2", "trainer.limit_val_batches=1", "logger=none"]  # the default job
    proc = _run(job, elsewhere, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (summary_path,) = (elsewhere / "runs" / "sentiment_qlora").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["train"]["steps"] == 2
    assert summary["version"] == lightning_qlora.__version__
    assert (summary_path.parent / "adapter" / "adapter_config.json").is_file()
