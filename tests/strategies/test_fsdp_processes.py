"""qlora_fsdp when a process dies: the others end with an error instead of waiting forever.

Each run is fsdp_script.py through Lightning's own launcher (rank 0 starts rank 1); one rank leaves with
`os._exit` at step 2, as a crash or an out-of-memory kill would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from strategies.fsdp_launch import failure, run_script


@pytest.mark.parametrize(
    "rank", [1, pytest.param(0, marks=pytest.mark.slow)], ids=["worker_dies", "launcher_dies"]
)
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
