"""Shared test fixtures: the golden files (copied from shared/golden into tests/data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

# The suite runs on 2 cores; small tensors run faster on one thread and tests stay deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA
