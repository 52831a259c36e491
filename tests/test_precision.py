"""Precision auto (the default): bf16 autocast on a CUDA device that supports bf16, fp32 on CPUs and older GPUs;
an explicit --precision wins; config.json records the precision the run used and that auto chose it. The CUDA
compute capability is monkeypatched (the decision is tested without a GPU; tests/test_cuda.py runs bf16 on one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from refiner.cli import cli
from refiner.config import REFINE_DEFAULTS, TrainConfig, resolve_precision
from refiner.presets import get_preset

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("capability, device, expected", [
    ((9, 0), CUDA, "bf16"),  # H100
    ((8, 0), CUDA, "bf16"),  # A100
    ((7, 5), CUDA, "fp32"),  # T4: bf16 only emulated (torch.cuda.is_bf16_supported() would say True)
    ((7, 0), CUDA, "fp32"),  # V100
    ((9, 0), CPU, "fp32"),
])
def test_auto_decision(monkeypatch, capability: tuple[int, int], device: torch.device, expected: str):
    asked: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", device) == expected
    assert asked == ([device] if device.type == "cuda" else [])  # asked of this device; a CPU run never asks
    for given in ("fp32", "bf16", "fp16"):  # an explicit choice is kept
        assert resolve_precision(given, device) == given


def test_for_device_records_the_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    config = TrainConfig(sources={"precision": "preset"})
    assert config.precision == REFINE_DEFAULTS.precision == get_preset(None).precision == "auto"
    on_gpu = config.for_device(CUDA)
    assert (on_gpu.precision, on_gpu.sources["precision"]) == ("bf16", "preset (auto on cuda)")
    assert on_gpu.for_device(CPU) is on_gpu  # resolved once; a resolved config is kept as it is
    assert config.precision == "auto"  # the original is not changed
    assert TrainConfig().for_device(CPU).sources == {"precision": "default (auto on cpu)"}
    explicit = TrainConfig(precision="fp16")
    assert explicit.for_device(CUDA) is explicit
    # a run resumed on the same kind of device resolves to the same precision: no configuration difference
    assert not on_gpu.differences(config.for_device(CUDA))


@pytest.mark.parametrize("given, expected, source", [(None, "fp32", "default (auto on cpu)"),
                                                     ("bf16", "bf16", "user")])
def test_config_json_records_precision(tmp_path: Path, given: str | None, expected: str, source: str):
    out = tmp_path / "toy"
    args = ["toy", "--out", str(out), "--steps", "1", "--batch", "16", "--fake-warmup", "0", "--samples", "10",
            "--device", "cpu", *(["--precision", given] if given else [])]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["precision"], config["sources"]["precision"]) == (expected, source)
