"""Every script in examples/ runs from a clean checkout, at its small size, and says what it showed.

Each runs as a user would run it (a fresh interpreter, its own command line), so an example that drifts
from the package's API fails here rather than in a user's hands. The scripts are found by globbing, so a
new example is covered without being listed: it must take `--smoke` and answer `--help` before importing
torch, transformers or Lightning (which take seconds), as every example here does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
HEAVY = ("torch", "transformers", "lightning", "peft", "bitsandbytes")

# A line an example's --smoke output must contain, where it prints one worth checking. Scripts not named
# here must still exit 0.
EXPECTED = {
    "quickstart.py": "training accuracy after 3 steps",
    "quantize_while_loading.py": "bits/param",
    "export_peft_merge.py": "merged model vs the trained model",
    "ddp.py": "rank 1: 2 steps, adapters identical to rank 0's: True",
    "custom_task.py": "3 steps, training accuracy",
    "chat_sft.py": "3 steps: validation loss on the answers",
}

# Runs a script as `python <script> <args>` would, then names the heavy modules it imported.
PROBE = """
import runpy, sys
script, *args = sys.argv[1:]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("exit code:", code, "heavy modules:", heavy)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _probe(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = PROBE.format(heavy=HEAVY)
    return subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES / script), *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_examples_are_found() -> None:
    assert set(EXPECTED) <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_before_heavy_imports(script: str, tmp_path: Path) -> None:
    proc = _probe(script, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exit code: 0 heavy modules: []" in proc.stdout, proc.stdout[-4000:]
    assert "--smoke" in proc.stdout, f"{script} --help does not offer --smoke:\n{proc.stdout}"
    assert not any(tmp_path.iterdir()), "--help wrote files"


def test_custom_task_refuses_a_wrong_key_before_importing_torch(tmp_path: Path) -> None:
    proc = _probe("custom_task.py", "lora.rr=8", cwd=tmp_path)
    assert "exit code: 2 heavy modules: []" in proc.stdout, proc.stdout + proc.stderr
    assert "lora.rr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_custom_task_prints_its_composed_config(tmp_path: Path) -> None:
    proc = _probe("custom_task.py", "--print-config", "lora.r=16", "--smoke", cwd=tmp_path)
    assert "exit code: 0 heavy modules: []" in proc.stdout, proc.stdout + proc.stderr
    assert "  r: 16\n" in proc.stdout
    assert "smoke: true\n" in proc.stdout


# Each --smoke run takes 8-15 s of CPU (mostly imports; ddp.py starts two processes): marked slow, still
# run in CI.
@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_with_smoke(script: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,  # generous: imports alone can take minutes on a busy shared CPU
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{output[-4000:]}"
    expected = EXPECTED.get(script)
    if expected is not None:
        assert expected in output, f"{script} did not print {expected!r}:\n{output[-4000:]}"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [], f"{script} --smoke left files in the working folder: {leftovers}"
