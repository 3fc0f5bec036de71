"""qlora_fsdp across machines and when a process dies: 2 nodes x 1 process on localhost, and killed ranks.

Each run is fsdp_script.py: the 2-node run started as a cluster launcher would (NODE_RANK per process), the
killed runs through Lightning's own launcher (rank 0 starts rank 1).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from strategies.fsdp_launch import failure, run_script, start_ranks


@pytest.mark.slow
def test_two_nodes_one_process_each_train_like_one_node_with_two(tmp_path: Path) -> None:
    results = start_ranks(
        "fsdp_script.py",
        str(tmp_path / "nodes"),
        "--devices",
        "1",
        "--num-nodes",
        "2",
        "--timeout",
        "600",
        world=2,
        nodes=True,
    )
    for result in results:
        assert result.returncode == 0, failure(result)
    one_node = run_script("fsdp_script.py", str(tmp_path / "one"), "--devices", "2")
    assert one_node.returncode == 0, failure(one_node)
    nodes = [torch.load(tmp_path / "nodes" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    local = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    assert [n["world_size"] for n in nodes] == [2, 2]
    assert nodes[0]["local_4bit_bytes"] == nodes[1]["local_4bit_bytes"] == local["local_4bit_bytes"]
    for key, value in local["adapters"].items():
        assert torch.equal(nodes[0]["adapters"][key], value), key  # the same arithmetic, the same order


@pytest.mark.parametrize("rank", [1, 0], ids=["worker_dies", "launcher_dies"])
def test_a_rank_killed_mid_run_ends_the_job(tmp_path: Path, rank: int) -> None:
    started = time.monotonic()
    # the script's process group times out after 60 s; a peer's closed connection ends it sooner
    result = run_script(
        "fsdp_script.py",
        str(tmp_path),
        "--kill-rank",
        str(rank),
        "--kill-step",
        "2",
        "--timeout",
        "60",
        timeout=400,
    )
    assert result.returncode != 0, failure(result)
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()
    # ended by the dead peer's closed connection or the 60 s process-group timeout, not by ours
    assert time.monotonic() - started < 400
