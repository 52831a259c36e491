"""Every generator loss on the exact-teacher toys, and optionally on the demo: a table for the README.

Toy (ring, grid; `refiner toy` defaults, each loss with its own defaults): energy distance over the noise
floor, modes covered, CPU seconds of the run and relative to ikl. `--cost`: CPU time of one iteration per loss
on an EDM U-Net (the back-propagation through the networks' inputs shows there, not on the 2-D toy). Demo
(`--demo refine,distill`; ~3.5 min per run on a free CPU): domain FD before/after and seconds, same steps,
seeds and sample counts for every loss. Usage:

    OMP_NUM_THREADS=1 python benchmarks/losses.py [--losses ikl,sid,uni:fkl] [--targets ring,grid] [--steps N]
                                                   [--demo refine,distill] [--demo-steps N] [--cost]

A loss written `uni:fkl` / `uni:js` is uni with that --divergence (its density ratio from a discriminator on
real samples: the toy's target, the demo's Fashion-MNIST training set).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from refiner.config import resolve_config
from refiner.losses import GENERATOR_LOSSES
from refiner.toy import TOY_DEFAULTS, run_toy

LOSSES = (*GENERATOR_LOSSES, "uni:fkl", "uni:js")


def loss_options(label: str) -> dict[str, str]:
    """The --loss (and --divergence) of a loss label: 'sid' or 'uni:fkl'."""
    name, _, divergence = label.partition(":")
    return {"loss": name, **({"divergence": divergence} if divergence else {})}


def toy_row(loss: str, target: str, steps: int | None, seed: int) -> dict:
    config = resolve_config(TOY_DEFAULTS, {**loss_options(loss), "device": "cpu", "steps": steps, "seed": seed})
    with tempfile.TemporaryDirectory() as out:
        start = time.process_time()  # CPU time: comparable between losses on a shared machine
        result = run_toy(config, out, target=target)
        seconds = time.process_time() - start
    return {"loss": loss, "target": target, "ratio_to_floor": result.energy_distance_after / result.noise_floor,
            "modes": f"{result.modes_covered}/{result.modes_total}", "seconds": seconds}


def cost_rows(losses: list[str], teacher_path: str, batch: int, repeats: int) -> dict[str, tuple[float, float]]:
    """CPU seconds of one generator step and of one whole iteration (+ one fake-score step) per loss, with an
    EDM U-Net as teacher, fake score and one-step generator (process time: robust to a shared machine)."""
    import torch

    from gan_adapters.onestep import OneStepGenerator
    from refiner.config import TrainConfig
    from refiner.jobs import trainable_copy
    from refiner.loop import make_sigma_sampler
    from refiner.losses import add_noise, denoising_loss, generator_objective
    from teachers.edm_loader import load_teacher

    torch.set_num_threads(1)
    teacher = load_teacher(teacher_path)
    generator, fake = OneStepGenerator.from_teacher(teacher, 2.5), trainable_copy(teacher)
    g = torch.Generator().manual_seed(0)
    z, c = generator.sample_latents(batch, g), generator.sample_labels(batch, g)
    sigma, noise = make_sigma_sampler(TrainConfig())(batch, g), torch.randn(batch, *generator.data_shape, generator=g)

    def timed(step) -> float:
        step()
        start = time.process_time()
        for _ in range(repeats):
            step()
        return (time.process_time() - start) / repeats

    def fake_step() -> None:
        with torch.no_grad():
            x = generator(z, c)
        denoising_loss(fake(add_noise(x, sigma, noise), sigma, c), x, sigma, 0.5).backward()

    fake_seconds = timed(fake_step)
    rows = {}
    for loss in losses:
        seconds = timed(lambda name=loss: generator_objective(name, generator(z, c), sigma, noise, teacher, fake,
                                                              c).backward())
        rows[loss] = (seconds, seconds + fake_seconds)
    return rows


def demo_row(loss: str, job: str, steps: int | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "refiner", "demo", "--job", job, "--out", out, "--json"]
        args += [a for k, v in loss_options(loss).items() for a in (f"--{k}", v)]
        args += ["--steps", str(steps)] if steps else []
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode:
        return {"loss": loss, "job": job, "error": proc.stderr.strip().splitlines()[-1:]}
    r = json.loads(proc.stdout)
    return {"loss": loss, "job": job, "fd_before": r["fd_before"], "fd_after": r["fd_after"], "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--targets", default="ring,grid")
    ap.add_argument("--steps", type=int, default=None, help="toy steps (default: refiner toy's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", default="", help="demo jobs to run for every loss, e.g. refine,distill")
    ap.add_argument("--demo-steps", type=int, default=None)
    ap.add_argument("--cost", action="store_true", help="also time one iteration on an EDM U-Net (the test fixture)")
    ap.add_argument("--cost-batch", type=int, default=8)
    args = ap.parse_args()
    losses = [s for s in args.losses.split(",") if s]
    if args.cost:
        costs = cost_rows(losses, "tests/data/edm-small-ddpmpp-edm-cond.pkl", args.cost_batch, 5)
        print(f"| loss | generator step, CPU s (batch {args.cost_batch}, 16x16 DDPM++) | vs ikl | "
              "iteration (+ fake step) vs ikl |\n|---|---|---|---|")
        for loss, (gen, total) in costs.items():
            print(f"| {loss} | {gen:.3f} | {gen / costs['ikl'][0]:.2f}x | {total / costs['ikl'][1]:.2f}x |", flush=True)
    rows = [toy_row(loss, target, args.steps, args.seed) for target in args.targets.split(",") if target
            for loss in losses]
    print("| loss | target | ED / noise floor | modes | CPU s (run) | vs ikl |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ikl = next((q["seconds"] for q in rows if q["loss"] == "ikl" and q["target"] == r["target"]), None)
        cost = f"{r['seconds'] / ikl:.2f}x" if ikl else "–"
        print(f"| {r['loss']} | {r['target']} | {r['ratio_to_floor']:.2f} | {r['modes']} | {r['seconds']:.0f} | "
              f"{cost} |", flush=True)
    if args.demo:
        print("\n| loss | demo job | FD before | FD after | s |\n|---|---|---|---|---|")
        for job in args.demo.split(","):
            for loss in losses:
                r = demo_row(loss, job, args.demo_steps)
                if "error" in r:
                    print(f"| {loss} | {job} | error: {r['error']} | | |", flush=True)
                else:
                    print(f"| {loss} | {job} | {r['fd_before']:.2f} | {r['fd_after']:.2f} | {r['seconds']:.0f} |",
                          flush=True)


if __name__ == "__main__":
    main()
