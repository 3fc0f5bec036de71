"""Shared test setup: offline hubs, quiet third-party chatter, and the `cuda` marker."""

from __future__ import annotations

import os
from collections.abc import Iterator

# One OpenMP thread in every process the tests start (the command, DDP/FSDP ranks, examples), set before
# torch starts its pool. The models are tiny, and on a 2-core machine running two test workers a second
# thread only waits: OpenMP splits each matmul evenly, so a thread sharing its core finishes last and
# the whole process runs at that pace (a SmolLM2 command test took 540 s that way, 90 s alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """The models here are tiny: a second intra-op thread only adds synchronisation, and on a busy 2-core
    machine it made small matmuls up to 1000x slower. Subprocesses (DDP, the CLI) keep their own setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
