"""--cudnn-benchmark: on by default, recorded in config.json, and a CPU run leaves torch's process-wide cuDNN
setting alone (on a GPU tests/test_cuda.py checks that the run sets it and keeps the update)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_distributed import _one_process


@pytest.mark.parametrize(("args", "recorded"), [((), True), (("--no-cudnn-benchmark",), False)])
def test_the_option_is_recorded_and_a_cpu_run_leaves_cudnn_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  args: tuple[str, ...], recorded: bool):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not recorded)  # restored afterwards
    _one_process(tmp_path / "run", "--steps", "1", *args)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cudnn_benchmark"] is recorded
    assert torch.backends.cudnn.benchmark is (not recorded)
