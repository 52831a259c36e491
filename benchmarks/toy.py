"""Toy benchmark: speed and quality of the Diff-Instruct loop on the 8-Gaussian ring (refiner toy defaults).

Prints steps/s, img/s (generator images per second, fake-score images included in the time), the final
energy distance against the noise floor, and the peak RSS. Usage: python benchmarks/toy.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import psutil

from refiner.toy import TOY_DEFAULTS, run_toy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=TOY_DEFAULTS.steps)
    ap.add_argument("--target", default="ring")
    args = ap.parse_args()
    config = TOY_DEFAULTS.__class__(**{**vars(TOY_DEFAULTS), "steps": args.steps, "device": "cpu"})
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run_toy(config, out, target=args.target)
        seconds = time.perf_counter() - start
        log = [json.loads(line) for line in open(f"{out}/log.jsonl")]
    rss = max(r["peak_rss_mb"] for r in log)
    print(f"target {args.target}, {args.steps} steps, batch {config.batch}, wall {seconds:.1f} s "
          f"(incl. evaluation)")
    print(f"  steps/s {args.steps / seconds:8.1f}")
    print(f"  img/s   {args.steps * config.batch / seconds:8.0f}   (loop only, mean of log windows: "
          f"{sum(r['img_per_s'] for r in log) / len(log):.0f})")
    print(f"  energy distance {result.energy_distance_after:.5f} vs noise floor {result.noise_floor:.5f} "
          f"= {result.energy_distance_after / result.noise_floor:.2f}x; modes {result.modes_covered}/"
          f"{result.modes_total}")
    print(f"  peak RSS {max(rss, psutil.Process().memory_info().rss / 2**20):.0f} MiB")


if __name__ == "__main__":
    main()
