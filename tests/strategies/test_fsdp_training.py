"""qlora_fsdp trains what one process trains: 2 gloo processes against the single-process reference.

The sharded runs are fsdp_script.py started as a script (Lightning relaunches it for rank 1); the
reference ("qlora", one process, the same global batches) runs in this process. Both write a checkpoint
every 3 steps and a PEFT export at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from strategies.fsdp_launch import failure, run_script, start_ranks
from strategies.fsdp_script import main as run_in_process

STEPS, EVERY = 6, 3


def _sharded(out: Path, *args: str) -> Path:
    result = run_script("fsdp_script.py", str(out), "--max-steps", str(STEPS), *args)
    assert result.returncode == 0, failure(result)
    return out


def _single(out: Path, *args: str) -> Path:
    run_in_process(
        [
            str(out),
            "--strategy",
            "qlora",
            "--devices",
            "1",
            "--batch-size",
            "8",
            "--max-steps",
            str(STEPS),
            *args,
        ]
    )
    return out


def _ckpt(out: Path, step: int) -> Path:
    (path,) = (out / "ckpt").glob(f"epoch=*-step={step}.ckpt")
    return path


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _single(tmp_path_factory.mktemp("single"), "--ckpt-every", str(EVERY), "--export")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sharded(tmp_path_factory.mktemp("fsdp"), "--ckpt-every", str(EVERY), "--export")


def test_sharded_adapters_equal_single_process_training(sharded: Path, reference: Path) -> None:
    rank0, rank1, single = (
        _load(sharded / "rank0.pt"),
        _load(sharded / "rank1.pt"),
        _load(reference / "rank0.pt"),
    )
    assert rank0["strategy"] == "QLoRAFSDPStrategy" and rank0["world_size"] == 2
    assert rank0["optimizer"] == "PagedAdamW32bit"  # bitsandbytes' paged AdamW, stepping local shards
    assert rank0["gradient_clip_val"] == 0.3
    # the ranks trained on different halves of each global batch; their mean loss is the single process's
    for step, loss in single["losses"].items():
        assert (rank0["losses"][step] + rank1["losses"][step]) / 2 == pytest.approx(loss, abs=1e-6)
    # clipping was active at every step (norm > 0.3) and the norm is the whole model's, not a shard's
    assert min(single["grad_norms"].values()) > 0.3
    for step, norm in single["grad_norms"].items():
        assert rank0["grad_norms"][step] == pytest.approx(norm, rel=1e-6)
    assert _max_diff(rank0["adapters"], single["adapters"]) <= 1e-6
    assert _max_diff(rank1["adapters"], rank0["adapters"]) == 0.0


def test_4bit_bytes_identical_and_split_between_ranks(sharded: Path, reference: Path) -> None:
    rank0, rank1, single = (
        _load(sharded / "rank0.pt"),
        _load(sharded / "rank1.pt"),
        _load(reference / "rank0.pt"),
    )
    assert rank0["packed"].keys() == single["packed"].keys() and rank0["packed"]
    for key, packed in single["packed"].items():
        assert torch.equal(rank0["packed"][key], packed), key
    # each rank keeps half the packed bytes; the quant-state statistics are replicated
    assert rank0["local_4bit_bytes"] == rank1["local_4bit_bytes"] == single["whole_4bit_bytes"] // 2
    assert rank0["stats_bytes"] == single["stats_bytes"]
    # the gathered full state has every quant-state tensor of the single-process model
    assert sorted(rank0["state"]) == sorted(single["state"])


def test_adapter_only_checkpoints_hold_the_single_process_state(sharded: Path, reference: Path) -> None:
    for step in (EVERY, STEPS):
        mine, theirs = _load(_ckpt(sharded, step)), _load(_ckpt(reference, step))
        assert all("lora_" in key for key in mine["state_dict"])  # adapter-only: no 4-bit base
        assert _max_diff(mine["state_dict"], theirs["state_dict"]) <= 1e-6
        ours_opt, their_opt = mine["optimizer_states"][0], theirs["optimizer_states"][0]
        assert ours_opt["state"].keys() == their_opt["state"].keys()
        for index, state in their_opt["state"].items():
            wrapped = "__bnb_optimizer_quant_state__"
            assert state[wrapped].keys() == ours_opt["state"][index][wrapped].keys()
            assert _max_diff(ours_opt["state"][index][wrapped], state[wrapped]) <= 1e-6  # whole states
        assert mine["lr_schedulers"] == theirs["lr_schedulers"]


def test_peft_export_equals_the_single_process_export(sharded: Path, reference: Path) -> None:
    ours, theirs = sharded / "peft", reference / "peft"
    assert (ours / "adapter_config.json").read_text() == (theirs / "adapter_config.json").read_text()
    assert (
        _max_diff(
            load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
        )
        <= 1e-6
    )


def test_resume_at_the_same_world_size_is_exact(sharded: Path, tmp_path: Path) -> None:
    resumed = _sharded(tmp_path, "--resume", str(_ckpt(sharded, EVERY)))
    full, again = _load(sharded / "rank0.pt"), _load(resumed / "rank0.pt")
    for step in range(EVERY, STEPS):
        assert again["losses"][step] == pytest.approx(full["losses"][step], abs=1e-7)
    assert _max_diff(again["adapters"], full["adapters"]) <= 1e-7


def test_sharded_checkpoint_resumes_on_one_process(sharded: Path, reference: Path, tmp_path: Path) -> None:
    resumed = _single(tmp_path, "--resume", str(_ckpt(sharded, EVERY)))
    assert (
        _max_diff(_load(resumed / "rank0.pt")["adapters"], _load(reference / "rank0.pt")["adapters"]) <= 1e-6
    )


@pytest.mark.slow
def test_single_process_checkpoint_resumes_on_two(reference: Path, tmp_path: Path) -> None:
    resumed = _sharded(tmp_path, "--resume", str(_ckpt(reference, EVERY)))
    assert (
        _max_diff(_load(resumed / "rank0.pt")["adapters"], _load(reference / "rank0.pt")["adapters"]) <= 1e-6
    )


@pytest.mark.slow
def test_two_nodes_with_one_process_each_train_like_one_node_with_two(sharded: Path, tmp_path: Path) -> None:
    """Started as a cluster's launcher starts them (NODE_RANK per process, Lightning starts none)."""
    args = ("--max-steps", str(STEPS), "--devices", "1", "--num-nodes", "2", "--timeout", "600")
    for result in start_ranks("fsdp_script.py", str(tmp_path), *args, world=2, nodes=True):
        assert result.returncode == 0, failure(result)
    nodes = [_load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    one_node = _load(sharded / "rank0.pt")
    assert [n["world_size"] for n in nodes] == [2, 2]
    assert nodes[0]["local_4bit_bytes"] == nodes[1]["local_4bit_bytes"] == one_node["local_4bit_bytes"]
    assert _max_diff(nodes[0]["adapters"], one_node["adapters"]) == 0.0  # the same arithmetic, in order
