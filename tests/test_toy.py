"""The full loop with a learned fake network on the 8-mode ring (the `refiner toy` defaults)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from refiner.config import resolve_config
from refiner.toy import TOY_DEFAULTS, run_toy


def test_ring_defaults_reach_the_noise_floor_and_cover_every_mode(tmp_path: Path):
    config = replace(TOY_DEFAULTS, device="cpu")
    result = run_toy(config, tmp_path / "ring", target="ring", samples=2000)
    assert result.modes_covered_before == 0 and result.energy_distance_before > 100 * result.noise_floor
    assert result.energy_distance_after <= 3 * result.noise_floor, result
    assert result.modes_covered == result.modes_total == 8


# Every loss on the ring, short (150 steps, batch 256, 100 fake warm-up steps, 1000 evaluation points), each with
# its own defaults (σ distributions, options): energy distance over the noise floor and modes covered as measured
# (torch CPU, one thread). Longer runs are in benchmarks/losses.py and the README: ikl reaches 3x the floor at
# refiner toy's 2000 steps (test above); at 500 steps sid (whose per-sample normalisation by mean|x − D_r| over
# two coordinates is noisy), sim and uni stay well above it, dmd close to it. uni:fkl / uni:js are uni with
# --divergence fkl / js, their density ratio from a discriminator trained on the target's samples: js stays
# close to rkl (its weights r/(1 + r) vary little), fkl's weights r = p/q hold back the samples far from the
# modes, and in 150 steps it covers none (the adversarial losses' own tests: tests/test_adversarial_loop.py).
SHORT_RUN = {"ikl": (4.35, 7), "dmd": (7.75, 7), "sid": (17.2, 2), "sim": (13.7, 3), "uni": (8.27, 5),
             "uni:fkl": (34.8, 0), "uni:js": (9.04, 5)}


@pytest.mark.parametrize("loss", SHORT_RUN)
def test_every_loss_moves_the_ring_generator_onto_the_modes(loss: str, tmp_path: Path):
    name, _, divergence = loss.partition(":")
    config = resolve_config(TOY_DEFAULTS, {"loss": name, "device": "cpu", "steps": 150, "batch": 256,
                                           "fake_warmup": 100, "divergence": divergence or None})
    result = run_toy(config, tmp_path / "run", target="ring", samples=1000)
    measured_ratio, measured_modes = SHORT_RUN[loss]
    assert result.energy_distance_before > 300 * result.noise_floor and result.modes_covered_before == 0
    assert result.energy_distance_after <= 1.5 * measured_ratio * result.noise_floor, result
    assert result.modes_covered >= measured_modes - 1, result
