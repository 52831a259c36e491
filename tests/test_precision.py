"""Precision auto (the default): bf16 autocast on a CUDA device that supports bf16, fp32 on CPUs and older GPUs;
an explicit --precision wins; config.json records the precision the run used and that auto chose it. The CUDA
capability is monkeypatched (the decision is tested without a GPU; tests/test_cuda.py runs bf16 on one)."""

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


@pytest.mark.parametrize("bf16_supported, device, expected", [
    (True, CUDA, "bf16"),  # Ampere and newer
    (False, CUDA, "fp32"),  # e.g. a V100 or T4
    (True, CPU, "fp32"),
    (False, CPU, "fp32"),
])
def test_auto_decision(monkeypatch, bf16_supported: bool, device: torch.device, expected: str):
    asked: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: asked.append(True) or bf16_supported)
    assert resolve_precision("auto", device) == expected
    assert asked == ([True] if device.type == "cuda" else [])  # a CPU run never queries CUDA
    for given in ("fp32", "bf16", "fp16"):  # an explicit choice is kept
        assert resolve_precision(given, device) == given


def test_for_device_records_the_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
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
