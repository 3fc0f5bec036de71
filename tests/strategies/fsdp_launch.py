"""Starting the multi-process scripts of the qlora_fsdp tests: free ports, a clean environment, logs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).parent
# Variables with which a launcher tells a process its place; a test's own launch must not inherit them.
_PLACEMENT = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "GROUP_RANK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PLACEMENT}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_script(
    script: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HERE / script), *args],
        env=dict(env) if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_ranks(
    script: str, *args: str, world: int, timeout: float = 600, nodes: bool = False
) -> list[subprocess.CompletedProcess[str]]:
    """Start `world` processes of `script` and wait for all of them: with torch's RANK/WORLD_SIZE variables,
    or with `nodes`, as one process on each of `world` nodes (NODE_RANK, LOCAL_RANK=0), as a cluster's
    launcher starts them (Lightning then starts no process itself)."""
    port = str(free_port())
    common = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}

    def place(rank: int) -> dict[str, str]:
        return {"NODE_RANK": str(rank), "LOCAL_RANK": "0"} if nodes else {"RANK": str(rank)}

    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / script), *args],
            env=clean_env(**common, **place(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def failure(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
