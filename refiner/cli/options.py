"""Options shared by every training command (toy, refine, distill) and their mapping to TrainConfig."""

from __future__ import annotations

from typing import Any, Callable

import click

from fileformats.errors import UserError
from refiner.config import PRECISIONS, TEACHER_MODES, TrainConfig
from refiner.losses import GENERATOR_LOSSES
from refiner.sigma import SIGMA_SAMPLERS


def training_options(defaults: TrainConfig) -> Callable:
    """Decorator adding the common options, with the job's own defaults shown in --help."""
    d = defaults
    options = [
        click.option("--out", "out", type=click.Path(file_okay=False), required=True,
                     help="Run directory: config.json, log.jsonl, checkpoints/ and outputs."),
        click.option("--steps", type=int, default=d.steps, show_default=True, help="Generator updates."),
        click.option("--batch", type=int, default=d.batch, show_default=True,
                     help="Global batch size (split over processes)."),
        click.option("--seed", type=int, default=d.seed, show_default=True, help="Random seed."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--force", is_flag=True, help="Delete an existing run in --out and start over."),
        click.option("--device", default=d.device, show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--lr", type=float, default=d.lr, show_default=True, help="Generator learning rate."),
        click.option("--fake-lr", type=float, default=d.fake_lr, show_default=True,
                     help="Fake-score network learning rate."),
        click.option("--ratio", type=int, default=d.ratio, show_default=True,
                     help="Fake-score updates per generator update."),
        click.option("--ema", type=float, default=d.ema, show_default=True,
                     help="EMA half-life of the generator in kimg (0 = no averaging)."),
        click.option("--snapshot-every", type=int, default=d.snapshot_every, show_default=True,
                     help="Generator updates between checkpoints (0 = at the end only)."),
        click.option("--loss", type=click.Choice(sorted(GENERATOR_LOSSES)), default=d.loss, show_default=True,
                     help="Generator loss: ikl = Diff-Instruct, dmd = DMD's normalised IKL."),
        click.option("--sigma", type=click.Choice(sorted(SIGMA_SAMPLERS)), default=d.sigma, show_default=True,
                     help="Noise levels of the loss: lognormal = ln σ ~ N(p-mean, p-std²); karras = uniform over "
                          "the Karras sampling grid."),
        click.option("--p-mean", type=float, default=d.p_mean, show_default=True,
                     help="Mean of ln σ (lognormal). Higher weighs coarse structure more: the demo's refinement "
                          "needed 0 instead of EDM's -1.2."),
        click.option("--p-std", type=float, default=d.p_std, show_default=True, help="Std of ln σ (lognormal)."),
        click.option("--beta1", type=float, default=d.betas[0], show_default=True, help="Adam beta1."),
        click.option("--beta2", type=float, default=d.betas[1], show_default=True, help="Adam beta2."),
        click.option("--fake-warmup", type=int, default=d.fake_warmup, show_default=True,
                     help="Fake-score updates before the first generator update."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=d.precision, show_default=True,
                     help="Mixed precision on CUDA (always fp32 on CPU)."),
        click.option("--teacher-mode", type=click.Choice(TEACHER_MODES), default=d.teacher_mode,
                     show_default=True,
                     help="Generator step: eval = teacher and fake score without dropout; train-shared-dropout = "
                          "both in train mode with the same dropout masks (the official Diff-Instruct code)."),
        click.option("--augment", type=float, default=d.augment, show_default=True,
                     help="Probability of EDM's AugmentPipe on the fake-score step (official Diff-Instruct: "
                          "0.12; needs an EDM fake-score network); 0 = off."),
        click.option("--log-every", type=int, default=d.log_every, show_default=True,
                     help="Generator updates between log records."),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


TRAINING_KEYS = ("steps", "batch", "seed", "device", "lr", "fake_lr", "ratio", "ema", "snapshot_every", "loss",
                 "sigma", "p_mean", "p_std", "fake_warmup", "precision", "log_every", "teacher_mode", "augment")


def config_from_options(defaults: TrainConfig, kwargs: dict[str, Any], **extra: Any) -> TrainConfig:
    """Build the run's TrainConfig from the parsed options (removing them from kwargs)."""
    values = {k: kwargs.pop(k) for k in TRAINING_KEYS}
    betas = (kwargs.pop("beta1"), kwargs.pop("beta2"))
    fields = {**vars(defaults), **values, "betas": betas, "extra": {**defaults.extra, **extra}}
    return TrainConfig(**fields).validate()


def run_options(kwargs: dict[str, Any]) -> tuple[str, bool, bool]:
    return kwargs.pop("out"), kwargs.pop("resume"), kwargs.pop("force")



def metric_options(f: Callable) -> Callable:
    """--metrics/--ref/--detector/--frontend: metrics before the first step and after the last."""
    options = [
        click.option("--metrics", "metrics", default=None,
                     help="Metrics before and after, e.g. fid50k,is50k,kid50k (none by default)."),
        click.option("--ref", default=None, help="Reference images or mu/sigma .npz for FID / KID."),
        click.option("--detector", default=None, help="Inception weights: path or URL (see `refiner metrics`)."),
        click.option("--frontend", type=click.Choice(["nvidia", "pytorch-fid"]), default="nvidia",
                     show_default=True, help="Resize and scaling conventions of the detector."),
        click.option("--metrics-at-snapshots", is_flag=True, help="Also measure at every snapshot."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_evaluator(kwargs: dict[str, Any], device) -> Callable | None:
    """The evaluator the metric options ask for (None without --metrics); removes them from kwargs."""
    spec, ref, detector, frontend = (kwargs.pop(k) for k in ("metrics", "ref", "detector", "frontend"))
    if spec is None:
        if ref is not None or detector is not None:
            raise UserError("--ref / --detector are given without --metrics; add e.g. --metrics fid10k")
        return None
    from metrics.detector import load_detector
    from metrics.evaluate import evaluate, parse_metrics

    requests = parse_metrics(spec)
    if ref is None and any(r.name in ("fid", "kid") for r in requests):
        raise UserError("FID and KID need --ref (reference images or an .npz with mu and sigma)")
    net = load_detector(detector, frontend=frontend, device=device)
    return lambda generator: evaluate(generator, net, spec, ref=ref, frontend=frontend)
