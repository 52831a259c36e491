"""The full loop with a learned fake network on the 8-mode ring (the `refiner toy` defaults)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from refiner.toy import TOY_DEFAULTS, run_toy


def test_ring_defaults_reach_the_noise_floor_and_cover_every_mode(tmp_path: Path):
    config = replace(TOY_DEFAULTS, device="cpu")
    result = run_toy(config, tmp_path / "ring", target="ring", samples=2000)
    assert result.modes_covered_before == 0 and result.energy_distance_before > 100 * result.noise_floor
    assert result.energy_distance_after <= 3 * result.noise_floor, result
    assert result.modes_covered == result.modes_total == 8
