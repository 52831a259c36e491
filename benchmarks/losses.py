"""Every generator loss on the exact-teacher toys, and optionally on the demo: a table for the README.

Toy (ring, grid; `refiner toy` defaults, each loss with its own defaults): energy distance over the noise
floor, modes covered, seconds, and the cost of one iteration relative to ikl (the loop's img/s). Demo
(`--demo refine,distill`; ~3.5 min per run on a free CPU): domain FD before/after and seconds, same steps,
seeds and sample counts for every loss. Usage:

    OMP_NUM_THREADS=1 python benchmarks/losses.py [--losses ikl,sid] [--targets ring,grid] [--steps N]
                                                   [--demo refine,distill] [--demo-steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from refiner.cli.options import resolve_config
from refiner.losses import GENERATOR_LOSSES
from refiner.toy import TOY_DEFAULTS, run_toy


def toy_row(loss: str, target: str, steps: int | None, seed: int) -> dict:
    config = resolve_config(TOY_DEFAULTS, {"loss": loss, "device": "cpu", "steps": steps, "seed": seed})
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run_toy(config, out, target=target)
        seconds = time.perf_counter() - start
        log = [json.loads(line) for line in open(f"{out}/log.jsonl")]
    return {"loss": loss, "target": target, "ratio_to_floor": result.energy_distance_after / result.noise_floor,
            "modes": f"{result.modes_covered}/{result.modes_total}", "seconds": seconds,
            "img_per_s": sum(r["img_per_s"] for r in log) / len(log)}


def demo_row(loss: str, job: str, steps: int | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "refiner", "demo", "--job", job, "--loss", loss, "--out", out, "--json"]
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
    ap.add_argument("--losses", default=",".join(GENERATOR_LOSSES))
    ap.add_argument("--targets", default="ring,grid")
    ap.add_argument("--steps", type=int, default=None, help="toy steps (default: refiner toy's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", default="", help="demo jobs to run for every loss, e.g. refine,distill")
    ap.add_argument("--demo-steps", type=int, default=None)
    args = ap.parse_args()
    losses = [s for s in args.losses.split(",") if s]
    rows = [toy_row(loss, target, args.steps, args.seed) for target in args.targets.split(",") if target
            for loss in losses]
    print("| loss | target | ED / noise floor | modes | s | cost per iteration vs ikl |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ikl = next((q["img_per_s"] for q in rows if q["loss"] == "ikl" and q["target"] == r["target"]), None)
        cost = f"{ikl / r['img_per_s']:.2f}x" if ikl else "–"
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
