"""QLoRADDPStrategy: a real 2-process DDP fit on CPU (gloo), run as a script (see ddp_script.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _launch(out: Path, *args: str) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"DDP script failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps on 2 processes (6 batches per rank an epoch), a checkpoint every 6 steps."""
    out = tmp_path_factory.mktemp("ddp_full")
    _launch(out, "--max-steps", "12", "--ckpt-every", "6")
    return out


def _ranks(out: Path) -> tuple[dict, dict]:
    return torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)


def test_ddp_fit_identical_adapters_untouched_base(ddp_run: Path) -> None:
    rank0, rank1 = _ranks(ddp_run)
    assert rank0["strategy"] == "QLoRADDPStrategy"
    assert rank0["world_size"] == 2
    assert rank0["backend"] == "gloo"
    assert rank0["ddp_wrapped"] == "DistributedDataParallel"
    assert rank0["optimizer"] == "PagedAdamW32bit"
    assert rank0["gradient_clip_val"] == 0.3
    # DDP all-reduces the adapters' gradients only: 8 tensors, 4 bytes per adapter weight
    adapter_numel = sum(v.numel() for v in rank0["adapters"].values())
    assert rank0["ddp_reduced"] == {
        "num_parameter_tensors": 8,
        "total_parameter_size_bytes": 4 * adapter_numel,
    }
    # the ranks saw different data ...
    assert rank0["losses"] != rank1["losses"]
    assert sorted(rank0["losses"]) == list(range(12))
    # ... yet hold the very same adapters, which trained
    assert rank0["adapters"].keys() == rank1["adapters"].keys()
    assert len(rank0["adapters"]) == 8
    for key, value in rank0["adapters"].items():
        assert torch.equal(value, rank1["adapters"][key]), key
        if "lora_B" in key:
            assert value.abs().max() > 1e-3, key
    # the frozen 4-bit base is exactly the NF4 (double-quantized, blocksize 64) image of the initial weights
    initial = torch.load(ddp_run / "initial_fp32.pt", weights_only=True)
    assert len(initial) == 4
    for name, weight in initial.items():
        codes, state = bnb_functional.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        # bitsandbytes' arithmetic over the flat block layout quantize_4bit writes (its public CPU
        # dequantize_4bit indexes blocks per row on AVX-512 CPUs when rows end inside a block, as 16 do)
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        nibbles = torch.stack([codes.view(-1) >> 4, codes.view(-1) & 0x0F], dim=1).view(-1).long()
        scale = absmax.float().repeat_interleave(64)[: weight.numel()]
        reference = (state.code[nibbles[: weight.numel()]] * scale).view(weight.shape)
        key = f"{name}.base_layer"
        assert torch.equal(rank0["base"][key], reference), key
        assert torch.equal(rank1["base"][key], reference), key


def test_ddp_only_rank0_writes_checkpoints(ddp_run: Path) -> None:
    written = sorted(p.name for p in (ddp_run / "ckpt").iterdir())
    assert written == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt"]
    assert (ddp_run / "saved_by_rank0.txt").read_text().split() == written
    assert not (ddp_run / "saved_by_rank1.txt").exists()
    checkpoint = torch.load(ddp_run / "ckpt" / written[0], weights_only=True)
    assert all("lora_" in k for k in checkpoint["state_dict"])
    assert len(checkpoint["state_dict"]) == 8
    assert len(checkpoint["optimizer_states"][0]["state"]) == 8


def test_ddp_resume_continues_exactly(ddp_run: Path, tmp_path: Path) -> None:
    _launch(tmp_path, "--max-steps", "12", "--resume", str(ddp_run / "ckpt" / "epoch=0-step=6.ckpt"))
    for full, resumed in zip(_ranks(ddp_run), _ranks(tmp_path), strict=False):
        assert sorted(resumed["losses"]) == list(range(6, 12))
        expected = [full["losses"][s] for s in range(6, 12)]
        assert [resumed["losses"][s] for s in range(6, 12)] == pytest.approx(expected, abs=1e-6, rel=0)
        for key, value in full["adapters"].items():
            torch.testing.assert_close(resumed["adapters"][key], value, rtol=0, atol=1e-6)
