"""benchmarks/gpu_iteration.py: its memory extrapolation and peak table by hand, and its --smoke run on the CPU
(the CUDA measurement itself needs a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_iteration  # noqa: E402


def test_largest_batch_on_the_line_through_two_measurements():
    gib = 2**30
    # 10 GiB fixed (weights, Adam, EMA) + 0.5 GiB per image: 80 GiB holds (80 - 10) / 0.5 = 140 images
    points = [(32, 10 * gib + 16 * gib), (64, 10 * gib + 32 * gib)]
    assert gpu_iteration.largest_batch(points, 80 * gib) == 140
    assert gpu_iteration.largest_batch(points, 80 * gib - 1) == 139
    assert gpu_iteration.largest_batch(points, 5 * gib) == 0
    with pytest.raises(ValueError, match="did not grow"):
        gpu_iteration.largest_batch([(32, gib), (64, gib)], 80 * gib)


def test_peak_table():
    assert gpu_iteration.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert gpu_iteration.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_iteration.peak_tflops("NVIDIA L40S") == 362.0 and gpu_iteration.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_iteration.peak_tflops("Tesla V100-SXM2-16GB") is None


def test_smoke_run_counts_the_iteration_flops(capsys):
    result = gpu_iteration.main(["--smoke"])
    assert (result["device"], result["precision"], result["batch"]) == ("CPU", "fp32", 2)
    assert result["img_per_s"] > 0 and result["percent_of_peak"] is None and "largest_batch" not in result
    # the tiny DDPM++ (16 channels): 9 forward-equivalents of its 0.174 GFLOP forward per image, as the
    # full-size network's 381.4 = 9 x 42.4 GFLOP (FlopCounterMode on the CPU)
    assert result["gflop_per_image"] == pytest.approx(1.57, abs=0.01)
    assert '"img_per_s"' in capsys.readouterr().out


def test_smoke_variants_and_sweep_count_their_own_arithmetic(capsys):
    result = gpu_iteration.main(["--smoke", "--variants", "reuse-pass,channels-last", "--sweep", "4"])
    rows = {(r["run"], r["batch"]): r for r in result["variants"]}
    assert set(rows) == {("reuse-pass", 2), ("channels-last", 2), ("default", 4)}
    # --reuse-pass: 7 of the 9 forward-equivalents; the layout and the batch leave the arithmetic per image alone
    assert rows["reuse-pass", 2]["gflop_per_image"] == pytest.approx(1.57 * 7 / 9, abs=0.01)
    assert rows["channels-last", 2]["gflop_per_image"] == rows["default", 4]["gflop_per_image"] == result[
        "gflop_per_image"]
    assert all(r["img_per_s"] > 0 for r in rows.values())
