"""Every script in examples/ runs from a clean checkout, at its small size, and says what it showed.

Each runs as a user would run it (a fresh interpreter, its own command line), so an example that drifts
from the package's API fails here rather than in a user's hands.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script, its small-size arguments, a line its output must contain. Each takes 8-15 s of CPU (mostly
# imports; ddp.py starts two processes), so all are marked slow; they still run in CI.
CASES = [
    pytest.param("quickstart.py", ["--smoke"], "training accuracy after 3 steps", marks=pytest.mark.slow),
    pytest.param("quantize_while_loading.py", ["--smoke"], "bits/param", marks=pytest.mark.slow),
    pytest.param(
        "export_peft_merge.py", ["--smoke"], "merged model vs the trained model", marks=pytest.mark.slow
    ),
    pytest.param("ddp.py", ["--smoke"], "rank 1: 2 steps, adapters identical to rank 0's: True",
                 marks=pytest.mark.slow),
    pytest.param("custom_task.py", ["smoke=true", "lora.r=4"], "3 steps, training accuracy",
                 marks=pytest.mark.slow),
    pytest.param("chat_sft.py", ["--smoke"], "3 steps: validation loss on the answers",
                 marks=pytest.mark.slow),
]  # fmt: skip


def test_every_example_is_covered() -> None:
    covered = {case.values[0] for case in CASES}
    assert covered == {p.name for p in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize(("script", "args", "expected"), CASES)
def test_example_runs(script: str, args: list[str], expected: str, tmp_path: Path) -> None:
    if script == "custom_task.py":
        args = [*args, f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # generous: imports alone can take minutes on a busy shared CPU
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{output[-4000:]}"
    assert expected in output, f"{script} did not print {expected!r}:\n{output[-4000:]}"


def test_chat_sft_help_imports_neither_torch_nor_transformers() -> None:
    """`--help` is read before the heavy imports, so it answers at once."""
    probe = (
        "import runpy, sys; sys.argv = ['chat_sft.py', '--help']\n"
        "try:\n    runpy.run_path({!r}, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]\n"
        "print('heavy imports:', heavy)\n"
    ).format(str(EXAMPLES / "chat_sft.py"))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--smoke" in proc.stdout
    assert "heavy imports: []" in proc.stdout
