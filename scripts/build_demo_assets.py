"""Build the demo's assets (assets/demo/) from Fashion-MNIST with refiner's own code.

    python scripts/build_demo_assets.py train --work WORK [--device cuda] [--part P ...] [--threads N]
    python scripts/build_demo_assets.py finalize --work WORK --out assets/demo [--gan-kimg K] [--sweep S.json]
    python scripts/build_demo_assets.py sweep --work WORK --out SWEEP.json [--variants JSON] [--steps N]

`train` trains the classifier, the EDM teacher and the GAN (each time-boxed), draws the teacher's 18-step
samples and scores everything into WORK/ (part-*.json record seeds, settings, wall times and the device;
build.json adds the data's sha256). `finalize` writes the committed asset folder with one GAN snapshot
(default: the rule of refiner.demo.build.select_snapshot) and CPU reference outputs. `sweep` runs the demo
on a few settings and records the FD reached every few steps: the evidence for the demo's defaults.

The committed assets were made like this (the default time boxes):

    train --work W --device cpu --threads 1 --part classifier     # 900 s
    train --work W --device cpu --threads 1 --part teacher        # 3000 s (in parallel with the classifier)
    train --work W --device cpu --threads 1 --part samples        # 2000 teacher samples
    train --work W --device cuda --part gan                       # 200 s on an H100
    train --work W --device cpu --part scores
    finalize --work W --out assets/demo --sweep sweep.json

Needs Fashion-MNIST: `apt-get install dataset-fashion-mnist` or `refiner data fashion-mnist`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fileformats.atomic import atomic_write_text
from refiner.demo.build import PARTS, BuildSettings, build_part, finalize, merge_parts, select_snapshot


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="phase", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--teacher-seconds", type=float, default=BuildSettings.teacher_seconds)
    t.add_argument("--gan-seconds", type=float, default=BuildSettings.gan_seconds)
    t.add_argument("--classifier-seconds", type=float, default=BuildSettings.classifier_seconds)
    t.add_argument("--teacher-samples", type=int, default=2000)
    t.add_argument("--max-steps", type=int, default=1 << 40, help="cap per trainer (quick test builds)")
    t.add_argument("--part", choices=PARTS, action="append",
                   help="build only these parts (repeatable; default all, in order). 'teacher' and 'gan' may run "
                        "in parallel processes once 'classifier' is done; 'samples' needs 'teacher'")
    t.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)")
    f = sub.add_parser("finalize")
    f.add_argument("--work", type=Path, required=True)
    f.add_argument("--out", type=Path, default=Path("assets/demo"))
    f.add_argument("--gan-kimg", default=None, help="GAN snapshot (default: the selection rule)")
    f.add_argument("--sweep", type=Path, default=None, help="sweep results to record in the manifest")
    s = sub.add_parser("sweep")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--variants", type=json.loads, default=DEFAULT_VARIANTS,
                   help='JSON list, e.g. \'[{"job": "refine", "lr": 1e-3, "batch": 16, "gan_kimg": "32"}]\'')
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--every", type=int, default=25, help="steps between measurements")
    s.add_argument("--samples", type=int, default=2000)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    if a.phase == "train":
        settings = BuildSettings(device=a.device, teacher_seconds=a.teacher_seconds, gan_seconds=a.gan_seconds,
                                 classifier_seconds=a.classifier_seconds, teacher_samples=a.teacher_samples,
                                 max_steps=a.max_steps)
        for part in a.part or PARTS:
            build_part(part, a.work, settings, echo=lambda m: print(m, flush=True))
    elif a.phase == "finalize":
        build = merge_parts(a.work)
        kimg, reason = select_snapshot(build)
        if a.gan_kimg is not None:
            kimg, reason = a.gan_kimg, f"chosen by hand (--gan-kimg {a.gan_kimg}); rule would give {kimg}"
        extra = {"sweep": json.loads(a.sweep.read_text())} if a.sweep else {}
        finalize(a.work, a.out, kimg, reason, extra)
    else:
        sweep(a.work, a.out, a.variants, a.steps, a.every, a.samples, a.device)


# The demo's recipe and its neighbours (EDM's σ distribution, a faster generator), and the distill job.
DEFAULT_VARIANTS = [dict(job="refine"), dict(job="refine", p_mean=-1.2), dict(job="refine", lr=1e-3, fake_lr=1e-3),
                    dict(job="distill")]


def sweep(work: Path, out: Path, variants: list[dict], steps: int, every: int, samples: int, device: str) -> None:
    """Run the demo (its own code path) for each variant, {job, lr, batch, loss, fake_lr, gan_kimg} with
    defaults from the job and the selection rule, recording FD and classifier score every `every` steps."""
    from refiner.demo.runner import JOBS, run_demo

    build = merge_parts(work)
    chosen, _ = select_snapshot(build)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            variant = dict(variant)
            job, kimg = variant.pop("job", "refine"), str(variant.pop("gan_kimg", chosen))
            assets = Path(tmp) / f"assets-{kimg}"
            if not assets.exists():
                finalize(work, assets, kimg, "sweep", echo=lambda m: None)
            variant.setdefault("fake_lr", variant.get("lr", JOBS[job].lr))
            config = replace(JOBS[job], steps=steps, snapshot_every=every, device=device, **variant)
            t0 = time.perf_counter()
            r = run_demo(Path(tmp) / "run", job=job, config=config, samples=samples, assets_path=assets,
                         force=True, echo=lambda m: None, curve_samples=samples)
            curve = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            results.append({"job": job, "gan_kimg": kimg, **variant, "samples": samples,
                            "fd_before": round(r.fd_before, 4), "fd_teacher": round(r.fd_teacher, 4),
                            "fd_floor": round(r.fd_floor, 4), "fd": {c["step"]: round(c["fd"], 4) for c in curve},
                            "cs": {c["step"]: round(c["cs"], 4) for c in curve},
                            "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()})
            print(json.dumps(results[-1]), flush=True)
            atomic_write_text(out, json.dumps(results, indent=1) + "\n")

if __name__ == "__main__":
    sys.exit(main())
