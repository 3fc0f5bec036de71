"""Fixtures shared by the PEFT-format and merge tests: a tiny Llama and its inputs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(7))
