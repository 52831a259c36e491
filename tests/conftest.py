"""Shared test fixtures: the golden files (tests/data, described in tests/data/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

# The suite runs on 2 cores; small tensors run faster on one thread and tests stay deterministic. The
# processes tests start (hard kills, torchrun) inherit one thread too, so their floating-point reductions
# match the in-process runs they are compared with.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA
