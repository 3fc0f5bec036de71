"""qlora_fsdp on one GPU with NCCL (world size 1): the CUDA path of the strategy against "qlora".

World size 1 exercises what the first GPU run must check: the NCCL process group, FSDP2 units on a CUDA
mesh, bitsandbytes' CUDA kernels over the gathered (re-wrapped) 4-bit weights, the local-shard optimizer
steps, the gathered checkpoint and export. scripts/cuda_check.sh runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from strategies.fsdp_launch import failure, run_script

pytestmark = pytest.mark.cuda


def _run(out: Path, *args: str) -> dict:
    result = run_script(
        "fsdp_script.py",
        str(out),
        "--accelerator",
        "gpu",
        "--devices",
        "1",
        "--batch-size",
        "8",
        "--max-steps",
        "6",
        "--export",
        *args,
    )
    assert result.returncode == 0, failure(result)
    return torch.load(out / "rank0.pt", weights_only=False)


def test_world_size_one_nccl_run_trains_what_qlora_trains(tmp_path: Path) -> None:
    sharded = _run(tmp_path / "fsdp")
    single = _run(tmp_path / "single", "--strategy", "qlora")
    assert sharded["strategy"] == "QLoRAFSDPStrategy" and sharded["backend"] == "nccl"
    for key, packed in single["packed"].items():
        assert torch.equal(sharded["packed"][key], packed), key
    for key, value in single["adapters"].items():
        torch.testing.assert_close(sharded["adapters"][key], value, rtol=1e-4, atol=1e-6)
    ours = load_file(tmp_path / "fsdp" / "peft" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "single" / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
