"""`refiner toy`: distil an exact 2-D Gaussian mixture into a one-step MLP generator."""

from __future__ import annotations

import json
from typing import Any

import click

from refiner.cli.options import config_from_options, run_options, training_options
from refiner.toy import TARGETS, TOY_DEFAULTS, run_toy


@click.command("toy")
@click.option("--target", type=click.Choice(sorted(TARGETS)), default="ring", show_default=True,
              help="ring = 8 Gaussians on a circle, grid = 25 Gaussians on a 5x5 grid.")
@click.option("--samples", type=click.IntRange(min=10, max=20000), default=2000, show_default=True,
              help="Points used for the energy distances (their pairwise distances are held in memory: 1.6 GB "
                   "at the maximum).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results on stdout.")
@training_options(TOY_DEFAULTS)
def command(target: str, samples: int, as_json: bool, **kwargs: Any) -> None:
    """Distil a 2-D Gaussian mixture (exact teacher) into a one-step generator."""
    out, resume, force = run_options(kwargs)
    config = config_from_options(TOY_DEFAULTS, kwargs, target=target)
    result = run_toy(config, out, target=target, samples=samples, resume=resume, force=force)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    r = result
    click.echo(f"target {r.target}: energy distance {r.energy_distance_before:.4f} -> "
               f"{r.energy_distance_after:.4f} (noise floor {r.noise_floor:.4f}, "
               f"{r.energy_distance_after / max(r.noise_floor, 1e-12):.1f}x floor); "
               f"modes covered {r.modes_covered}/{r.modes_total} (before {r.modes_covered_before})")
    click.echo(f"wrote {out}/toy.json, {out}/toy.png, {out}/log.jsonl")
