"""`refiner demo`: the built-in real-image demo (what `make demo` runs)."""

from __future__ import annotations

import json
from typing import Any

import click

from metrics.stats import IS_MIN_SAMPLES, IS_SPLITS
from refiner.cli.options import (
    BATCH,
    DEVICE,
    FINITE_FLOAT,
    SEED,
    TRAINING_KEYS,
    loss_and_sigma_options,
    speed_options,
)
from refiner.config import TEACHER_MODES
from refiner.demo.runner import JOBS, REFERENCES, demo_config


def _defaults_help() -> str:
    def sigma(c) -> str:
        options = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in c.sampler_options().items())
        fake = "" if c.fake_sigma in ("same", c.sigma) else f", fake-score σ {c.fake_sigma}"
        return f"σ {c.sigma}{fake}" + (f" ({options})" if options else "")

    return "; ".join(f"{job}: {c.steps} steps, batch {c.batch}, lr {c.lr:g}, fake-lr {c.fake_lr:g}, "
                     f"loss {c.loss}, {sigma(c)}, {c.fake_warmup} fake warm-up steps"
                     + (", --reuse-pass" if c.reuse_pass else "")
                     for job, c in ((job, demo_config(job, {})) for job in JOBS))


@click.command("demo", epilog=f"Defaults per job: {_defaults_help()}.")
@click.option("--job", type=click.Choice(sorted(JOBS)), default="refine", show_default=True,
              help="refine = improve the demo StyleGAN2 with the EDM teacher; distill = distil the teacher "
                   "into a one-step generator.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Run directory: report.html, grids, log.jsonl, checkpoints, the trained generator.")
@click.option("--force", is_flag=True, help="Delete an existing run in --out and start over.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Generator updates [per job].")
@click.option("--batch", type=BATCH, default=None, help="Batch size [per job].")
@click.option("--lr", type=FINITE_FLOAT, default=None, help="Generator learning rate [per job].")
@click.option("--fake-lr", type=FINITE_FLOAT, default=None, help="Fake-score learning rate [per job].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the training loop.")
@click.option("--teacher-mode", type=click.Choice(TEACHER_MODES), default=None,
              help="eval (default) or train-shared-dropout (the official Diff-Instruct generator step).")
@click.option("--augment", type=FINITE_FLOAT, default=None,
              help="EDM AugmentPipe probability on the fake-score step (official: 0.12; default 0).")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu, cuda[:N] or auto.")
@click.option("--samples", type=click.IntRange(min=IS_MIN_SAMPLES), default=2000, show_default=True,
              help=f"Images per FD / classifier-score measurement (at least {IS_MIN_SAMPLES}: the score's "
                   f"{IS_SPLITS} splits need 2 each).")
@click.option("--reference", type=click.Choice(REFERENCES), default="test", show_default=True,
              help="Reference statistics: the held-in half of the test set, or the training set.")
@click.option("--assets", "assets_path", type=click.Path(file_okay=False), default=None,
              help="Asset folder (default: the repository's assets/demo).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads. Default: this machine's idle physical cores (cores minus the cores busy "
                   "over half a second), 1 to 4: an idle laptop gets several, a busy machine one. Give --threads 1 "
                   "on a shared machine: other programs holding the cores make several threads many times slower "
                   "(measured: 2 threads trained 9x slower than 1 on a two-core machine at load 9).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results on stdout.")
@click.option("--data", "data_src", default=None, metavar="PATH",
              help="Real images for the adversarial losses (dmd2, sida), as for `refiner distill --data`. "
                   "Default: Fashion-MNIST's training set (found or downloaded like the noise floor's test set).")
@loss_and_sigma_options
@speed_options
def command(job: str, out: str, force: bool, resume: bool, steps: int | None, batch: int | None,
            lr: float | None, fake_lr: float | None, seed: int, teacher_mode: str | None, augment: float | None,
            device: str, samples: int, reference: str, assets_path: str | None, threads: int | None, as_json: bool,
            data_src: str | None, reuse_images: bool | None, reuse_pass: bool | None, compile: bool | None,
            **loss_and_sigma: Any) -> None:
    """Refine a small Fashion-MNIST GAN with an EDM teacher on the CPU, in minutes, and report by how much.

    Loads the committed assets (a small EDM teacher, an under-trained StyleGAN2, a Fashion-MNIST
    classifier), measures the domain Fréchet distance (FD, on the classifier's features) and classifier
    score of the GAN, of the teacher's 18-step samples and of real test images (the noise floor), runs the
    training loop (loss sid for refine, ikl = Diff-Instruct for distill: the best of the losses without real
    images in the README's comparison at the demo's length; the refinement shares one fake-network pass between
    its two steps, --reuse-pass), measuring the FD at every quarter of it (on 500 samples), measures again and
    writes OUT/report.html: before/after grids of the same seeds beside the teacher's samples and real test
    images, the FD during training, the loss curves. Prints the results and where the time went (loading, scoring,
    training, report, setup). Fashion-MNIST itself is only needed for a live noise floor and the real images
    (else the build-time value is shown).
    """
    import torch

    from refiner.demo.runner import default_threads, run_demo

    torch.set_num_threads(threads or default_threads())

    given = {"steps": steps, "batch": batch, "lr": lr, "fake_lr": fake_lr, "seed": seed, "device": device,
             "teacher_mode": teacher_mode, "augment": augment, "reuse_images": reuse_images, "reuse_pass": reuse_pass,
             "compile": compile,
             **{k: v for k, v in loss_and_sigma.items() if k in TRAINING_KEYS}}
    config = demo_config(job, given)
    result = run_demo(out, job=job, config=config, samples=samples, reference=reference,
                      assets_path=assets_path, force=force, resume=resume, data=data_src)
    click.echo(json.dumps(result.to_json()) if as_json else result.table())
