"""The toy job: distil an exact 2-D Gaussian-mixture teacher into a one-step MLP generator.

The teacher is analytic (teachers/analytic.py), so the only learned score is the fake one. With no teacher
weights to copy, the fake network (an EDM-preconditioned MLP) starts from random weights and is first
fitted to the initial generator's samples for `fake_warmup` denoising steps, so that the first generator
update already follows s_teacher − s_generator rather than a random field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw

from common.devices import resolve_device
from fileformats.atomic import atomic_open, atomic_write_text
from gan_adapters.mlp import MLPGenerator
from metrics.energy import energy_distance, modes_covered
from refiner.config import TrainConfig
from refiner.loop import Trainer
from refiner.realdata import TargetData
from refiner.rundir import RunDir, open_run
from teachers.analytic import GaussianMixtureDenoiser, grid, ring
from teachers.mlp import MLPDenoiser

TARGETS: dict[str, Callable[[], GaussianMixtureDenoiser]] = {"ring": lambda: ring(std=0.1), "grid": grid}

# Tuned on the ring (research notes have no toy recipe): a large batch matters most (the IKL gradient of the
# fine structure is small next to its noise); the EMA sharpens the modes.
TOY_DEFAULTS = TrainConfig(steps=2000, batch=1024, lr=2e-3, fake_lr=2e-3, betas=(0.0, 0.99), ema=80.0,
                           fake_warmup=200, log_every=100)


@dataclass
class ToyResult:
    target: str
    energy_distance_before: float
    energy_distance_after: float
    noise_floor: float
    modes_covered: int
    modes_total: int
    modes_covered_before: int
    samples: int

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def evaluate(samples: torch.Tensor, teacher: GaussianMixtureDenoiser, reference: torch.Tensor) -> tuple[float, int]:
    return (energy_distance(samples, reference),
            modes_covered(samples, teacher.means, float(teacher.stds.max())))


def noise_floor(teacher: GaussianMixtureDenoiser, samples: int, generator: torch.Generator, pairs: int = 9
                ) -> float:
    """The energy distance between two independent target samples of the same size: the median over
    `pairs` draws (single draws scatter widely and have a heavy tail from the sampled mode proportions)."""
    values = [energy_distance(teacher.sample(samples, generator), teacher.sample(samples, generator))
              for _ in range(pairs)]
    return float(torch.tensor(values).median())


@torch.no_grad()
def generate(generator: MLPGenerator, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    device = next(generator.parameters()).device
    return generator(generator.sample_latents(n, g).to(device)).cpu()


def run_toy(config: TrainConfig, out: str | Path, target: str = "ring", samples: int = 2000,
            resume: bool = False, force: bool = False, on_snapshot=()) -> ToyResult:
    """Train, evaluate before/after on `samples` points, write toy.json and toy.png into the run dir."""
    teacher = TARGETS[target]()
    # The toy networks are too small to gain from intra-op threads, and OpenMP threads that wait for a
    # busy core make each step up to ~50x slower: one thread is fastest here.
    torch.set_num_threads(1)
    config = config.for_device(resolve_device(config.device))
    with open_run(out, config, resume=resume, force=force) as (run, checkpoint):
        return _train_toy(config, run, checkpoint, teacher, target, samples, on_snapshot)


def _train_toy(config: TrainConfig, run: RunDir, checkpoint: Path | None, teacher: GaussianMixtureDenoiser,
               target: str, samples: int, on_snapshot) -> ToyResult:
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    generator = MLPGenerator(dim=2, z_dim=2).to(device)
    fake = MLPDenoiser(dim=2, sigma_data=teacher.sigma_data).to(device)
    trainer = Trainer(config, generator, teacher.to(device), fake, run, device, on_snapshot=on_snapshot,
                      real_data=TargetData(teacher))
    before = torch.from_numpy(run.kept("toy.before.npz", lambda: {  # the untrained generator's samples
        "before": generate(trainer.ema, samples, seed=config.seed + 1).numpy()})["before"])
    if checkpoint is not None:
        trainer.resume(checkpoint)
    trainer.train()
    after = generate(trainer.ema, samples, seed=config.seed + 1)
    g = torch.Generator().manual_seed(config.seed + 2)
    reference = teacher.sample(samples, g)
    ed_before, modes_before = evaluate(before, teacher, reference)
    ed_after, modes_after = evaluate(after, teacher, reference)
    result = ToyResult(target, ed_before, ed_after, noise_floor(teacher, samples, g), modes_after,
                       teacher.means.shape[0], modes_before, samples)
    atomic_write_text(run.path / "toy.json", json.dumps(result.to_json(), indent=2) + "\n")
    save_scatter(run.path / "toy.png", {"before": before, "after": after, "target": reference})
    return result


def save_scatter(path: Path, panels: dict[str, torch.Tensor], size: int = 320, extent: float | None = None
                 ) -> None:
    """Side-by-side scatter plots of 2-D point sets, one panel each, same axes."""
    extent = extent or float(max(p.abs().max() for p in panels.values())) * 1.1
    image = Image.new("RGB", (size * len(panels), size + 20), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels.items()):
        x0 = i * size
        draw.rectangle([x0 + 2, 22, x0 + size - 3, size + 17], outline=(180, 180, 180))
        draw.text((x0 + 8, 4), title, fill=(0, 0, 0))
        pix = ((points.clamp(-extent, extent) / extent + 1) / 2 * (size - 8) + 4).tolist()
        for px, py in pix:
            cx, cy = x0 + px, 20 + (size - py)
            draw.point([(cx, cy), (cx + 1, cy), (cx, cy + 1), (cx + 1, cy + 1)], fill=(31, 119, 180))
    with atomic_open(path) as f:
        image.save(f, format="PNG")
