"""What people expect of the training command: `--version`, a quick `--help`, Ctrl-C that keeps the work
and resumes, an error in training that keeps the work, DDP from the command line, TensorBoard's option.

Real subprocesses of `python -m lightning_qlora.cli.train` on the tiny causal LM (a few steps).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_run import cli_env, run_cli
from omegaconf import DictConfig

import lightning_qlora
from lightning_qlora.cli.interrupt import resume_command
from lightning_qlora.cli.job import build_loggers

TINY = [
    "experiment=smoke_tiny_llama",
    "data.batch_size=4",
    "data.max_length=24",
    "trainer.limit_val_batches=1",
    "model.num_samples_to_generate=1",
    "model.max_new_tokens=4",
    "logger=none",
]


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    proc = run_cli(["--version"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lightning-qlora {lightning_qlora.__version__}"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--cfg", "job"], ["--version"]],
)
def test_answers_without_importing_torch_or_lightning(tmp_path: Path, args: list[str]) -> None:
    """What makes `--help` and `--cfg job` quick: neither torch nor Lightning is imported for them."""
    code = (
        "import sys\n"
        f"sys.argv = ['lightning-qlora-train', *{args!r}]\n"
        "from lightning_qlora.cli.train import main\n"
        "main()\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules)\n"
        "print('heavy modules:', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "heavy modules: []" in proc.stdout


def test_help_lists_groups_and_applies_overrides(tmp_path: Path) -> None:
    proc = run_cli(["--help", "experiment=smoke_tiny_llama"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"lightning-qlora-train {lightning_qlora.__version__}" in proc.stdout
    assert "logger: csv, none, tensorboard, wandb" in proc.stdout
    assert "task_name: smoke_tiny_llama" in proc.stdout
    bad = run_cli(["--help", "lora.rr=3"], cwd=tmp_path, timeout=300)
    assert bad.returncode == 2
    assert "lora.rr" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_tensorboard_logger_option(compose_train: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = compose_train("logger=tensorboard")
    (logger,) = build_loggers(cfg.logger)
    assert type(logger).__name__ == "TensorBoardLogger"
    assert Path(logger.log_dir) == tmp_path / "tensorboard"


def test_tensorboard_missing_is_a_clear_error(
    compose_train: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("tensorboard", "tensorboardX"):  # None in sys.modules: `import name` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"needs the `tensorboard` package: `pip install tensorboard`"):
        build_loggers(compose_train("logger=tensorboard").logger)


def test_resume_command_survives_the_shell_and_hydra() -> None:
    """A sweep job's folder holds `=` and `,`: the printed ckpt_path must not read as a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = Path("/runs/multirun/0_lora.r=4,optimizer.lr=0.001")
    checkpoint = run_dir / "checkpoints" / "interrupted.ckpt"
    overrides = ["lora.r=4", "optimizer.lr=0.001", "ckpt_path=old.ckpt", "hydra.run.dir=elsewhere"]
    args = shlex.split(resume_command(overrides, checkpoint, run_dir))
    # the interpreter that ran, so the command works without the console script on PATH
    assert args[:5] == [sys.executable, "-m", "lightning_qlora.cli", "lora.r=4", "optimizer.lr=0.001"]
    parsed = OverridesParser.create().parse_overrides(args[5:])
    assert [o.key_or_group for o in parsed] == ["ckpt_path", "hydra.run.dir"]  # the run folder is kept
    assert not any(o.is_sweep_override() for o in parsed)
    assert [o.value() for o in parsed] == [str(checkpoint), str(run_dir)]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_ctrl_c_keeps_a_loadable_adapter_and_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    from peft import PeftModel

    from lightning_qlora.tasks import CausalLMInstructionModule

    run_dir = tmp_path / "run"
    sigint = "+callbacks.sigint={_target_:cli_signals.SendSignal,step:1}"
    proc = run_cli([*TINY, "trainer.max_steps=4", sigint, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Ctrl-C: stopping after this step" in proc.stderr
    summary = _summary(run_dir)
    assert summary["interrupted"] is True
    assert summary["version"] == lightning_qlora.__version__
    stopped_at = summary["train"]["steps"]
    assert 1 <= stopped_at < 4
    checkpoint = run_dir / "checkpoints" / "interrupted.ckpt"
    assert summary["checkpoint"] == str(checkpoint)
    assert checkpoint.is_file()
    assert f"ckpt_path={checkpoint}" in summary["resume_command"]
    assert f"resume with: {summary['resume_command']}" in proc.stdout
    # the adapter is a PEFT folder PEFT itself loads onto the same architecture
    adapter = run_dir / "adapter"
    peft_model = PeftModel.from_pretrained(CausalLMInstructionModule().model, str(adapter))
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())

    # the printed command as a user pastes it (less the test's Ctrl-C): it resumes in the same run folder
    command = [a for a in shlex.split(summary["resume_command"]) if not a.startswith("+callbacks.sigint")]
    assert command[:3] == [sys.executable, "-m", "lightning_qlora.cli"]
    interrupted_adapter = (adapter / "adapter_model.safetensors").read_bytes()
    proc = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = _summary(run_dir)
    assert resumed["interrupted"] is False and resumed["run_dir"] == str(run_dir)
    assert resumed["train"]["steps"] == 4
    assert resumed["train"]["tokens"] < summary["train"]["tokens"] * 4 / stopped_at  # only the rest ran
    assert resumed["adapter_dir"] == str(adapter)
    assert (adapter / "adapter_model.safetensors").read_bytes() != interrupted_adapter  # the later export
    assert checkpoint.is_file()


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sigint = "+callbacks.sigint={_target_:cli_signals.SendSignal,step:1,times:2}"
    proc = run_cli([*TINY, "trainer.max_steps=4", sigint, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 130
    assert "Second Ctrl-C: exiting now" in proc.stderr
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_an_error_in_training_keeps_the_adapter_and_a_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fail = "+callbacks.fail={_target_:cli_signals.SendSignal,step:2,raise_error:true}"
    proc = run_cli([*TINY, "trainer.max_steps=4", fail, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "test failure at step 2" in proc.stderr
    summary = _summary(run_dir)
    assert summary["interrupted"] is True
    assert summary["error"] == "RuntimeError: test failure at step 2"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert summary["curves"] == str(run_dir / "curves.png")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["sentiment_qlora"])  # smoke_tiny_llama passes too (about 2 minutes)
def test_ddp_with_two_cpu_processes(tmp_path: Path, experiment: str) -> None:
    """`trainer=ddp` on the default (MiniLM, mean pooling) job, where no adapter may sit outside the loss.
    The causal LM's length-grouped sharding is tested through Lightning's own loader re-creation
    (tests/tasks/test_instruction.py), which keeps the suite's time down."""
    run_dir = tmp_path / "run"
    args = [
        f"experiment={experiment}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_steps=2", "data.batch_size=4", "data.max_length=24", "trainer.limit_val_batches=1",
        "logger=none", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    if experiment == "smoke_tiny_llama":
        args += ["model.num_samples_to_generate=1", "model.max_new_tokens=4"]
    proc = run_cli(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["train"]["world_size"] == 2
    assert summary["train"]["steps"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
