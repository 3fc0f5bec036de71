"""A real 2-rank CPU DDP fit trains through the 4-bit workspace path (see ddp_cpu_path_script.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_cpu_path_script.py")


@pytest.mark.slow
def test_ddp_trains_through_the_workspace_path(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"DDP script failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for rank in (rank0, rank1):
        assert rank["layer_types"] == ["QLoRALinear4bit"]
        # every 4-bit output with grad enabled came from the workspace path, and a buffer was used
        # (the Python band loop, or the native operator where it is built)
        assert rank["grad_fns"] in (
            ["_FrozenLinearBackward"],
            ["GeneratedBackwardFor_lightning_qlora_linear4bit_defaultBackward"],
        )
        assert rank["workspace_bytes"] > 0
        # checkpointing recomputed each block in backward: 2 blocks x (forward + recompute) x 6 steps
        assert rank["block_forwards"] == 2 * 2 * 6
    assert rank0["losses"] != rank1["losses"]  # different data per rank ...
    assert rank0["adapters"].keys() == rank1["adapters"].keys() and rank0["adapters"]
    for key, value in rank0["adapters"].items():  # ... the same adapters, which trained
        assert torch.equal(value, rank1["adapters"][key]), key
        if "lora_B" in key:
            assert value.abs().max() > 0, key
    for key, value in rank0["base"].items():  # the frozen base is the same on both and untouched
        assert torch.equal(value, rank1["base"][key]), key
