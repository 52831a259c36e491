"""`refiner refine`: refine a GAN (StyleGAN2-ADA pickle) with Diff-Instruct and write it back in its own
format, so the user's own code loads it unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import click
import torch

from fileformats.errors import UserError
from refiner import distributed as dist
from refiner.cli.options import (
    config_from_options,
    make_evaluator,
    metric_options,
    run_options,
    training_options,
)
from refiner.config import TrainConfig

REFINE_DEFAULTS = TrainConfig(steps=1000, batch=64, lr=1e-5, fake_lr=1e-5, ema=10.0, snapshot_every=250,
                              log_every=10)


@click.command("refine")
@click.option("--generator", "generator_src", required=True,
              help="StyleGAN2-ADA network pickle (network-snapshot-*.pkl, path or URL) or a BigGAN-deep "
                   "folder (config.json + pytorch_model.bin).")
@click.option("--teacher", "teacher_src", required=True, help="EDM network pickle (its `ema`): path or URL.")
@click.option("--trainable", type=click.Choice(["all", "synthesis", "mapping-frozen"]), default=None,
              help="StyleGAN2-ADA: which weights train (default all); mapping-frozen = synthesis incl. style "
                   "affines; synthesis = synthesis convolutions only (the styles of a z are kept).")
@click.option("--noise-mode", type=click.Choice(["random", "const", "none"]), default=None,
              help="StyleGAN2-ADA: per-pixel noise during training (default random = what metrics sample).")
@click.option("--truncation", type=float, default=None,
              help="BigGAN-deep: truncation of the prior and batch-norm statistics (default 1.0).")
@click.option("--resize-to-teacher", is_flag=True,
              help="Area-downsample the generator's images to the teacher's resolution (e.g. a 128 px "
                   "BigGAN refined by a 64 px teacher).")
@click.option("--keep-G", "keep_g", is_flag=True, help="Write the refined weights into G_ema only; keep G.")
@click.option("--in-place", is_flag=True,
              help="Replace the input pickle once the refined one is written and re-read (keeps FILE.bak).")
@click.option("--teacher-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Teacher precision on CUDA (default: what the file says).")
@metric_options
@training_options(REFINE_DEFAULTS)
def command(generator_src: str, teacher_src: str, trainable: str | None, noise_mode: str | None,
            truncation: float | None, resize_to_teacher: bool, keep_g: bool, in_place: bool,
            teacher_dtype: str | None, metrics_at_snapshots: bool, **kwargs: Any) -> None:
    """Refine a GAN (StyleGAN2-ADA, BigGAN-deep) with an EDM teacher, written back in its own format.

    Writes OUT/network-refined.pkl (StyleGAN2-ADA; loads in NVIDIA's code unchanged) or the folder
    OUT/biggan-refined (BigGAN-deep) at every snapshot and at the end, before/after grids of the same
    seeds, log.jsonl, checkpoints and report.html. StyleGAN2 truncation is off during training.
    """
    from gan_adapters.loader import load_generator
    from gan_adapters.resize import Resized
    from refiner.jobs import ImageJob, check_compatible, trainable_copy
    from teachers.base import resolve_device
    from teachers.edm_loader import load_teacher

    out, resume, force = run_options(kwargs)
    family_options = {k: v for k, v in (("trainable", trainable), ("noise_mode", noise_mode),
                                        ("truncation", truncation)) if v is not None}
    config = config_from_options(REFINE_DEFAULTS, kwargs, generator=generator_src, teacher=teacher_src,
                                 keep_G=keep_g, resize_to_teacher=resize_to_teacher, **family_options)
    device = dist.setup(resolve_device(config.device))
    main = dist.rank() == 0
    backup = Path(f"{generator_src}.bak")
    if in_place:
        if not os.path.isfile(generator_src):
            raise UserError(f"--in-place needs a local generator file; {generator_src} is not one")
        if backup.exists():
            raise UserError(f"--in-place would keep the input as {backup}, which already exists; "
                            f"move it away first")
    generator = load_generator(generator_src, device=device, **family_options)
    is_folder = os.path.isdir(generator_src)
    if is_folder and (keep_g or in_place):
        raise UserError("--keep-G and --in-place apply to StyleGAN2-ADA pickles, not to BigGAN-deep folders")
    teacher = load_teacher(teacher_src, device=device, dtype=teacher_dtype)
    if resize_to_teacher:
        generator = Resized(generator, teacher.data_shape[-1])
    check_compatible(generator, teacher, generator_src, teacher_src)
    evaluate = make_evaluator(kwargs, device)

    def save(ema: torch.nn.Module, path: Path) -> None:
        ema.save(path, overwrite=True, **({} if is_folder else {"keep_G": keep_g}))

    fake = trainable_copy(teacher, config.augment > 0)
    job = ImageJob(config, generator.train(), teacher, fake, Path(out), device, save,
                   "biggan-refined" if is_folder else "network-refined.pkl", evaluate=evaluate,
                   metrics_at_snapshots=metrics_at_snapshots,
                   title="Diff-Instruct refinement of a GAN",
                   info={"generator": generator_src, "teacher": teacher_src},
                   echo=(lambda s: click.echo(s, err=True)) if main else (lambda s: None))
    result = job.run(resume=resume, force=force)
    if not main:
        return
    if in_place:
        replace_input(Path(generator_src), job.output_path, backup, job.ema)
        result["in_place"] = generator_src
    click.echo(json.dumps(result))


def replace_input(target: Path, refined: Path, backup: Path, reference: torch.nn.Module) -> None:
    """Re-read the refined file, then move the input to FILE.bak and put the refined file in its place."""
    from gan_adapters.loader import load_generator

    reread = load_generator(refined).state_dict()
    expected = reference.state_dict()
    if reread.keys() != expected.keys() or not all(torch.equal(reread[k], expected[k].cpu()) for k in expected):
        raise UserError(f"{refined} did not read back as the refined generator; {target} was left unchanged")
    shutil.copy2(target, backup)
    tmp = target.with_name(f".{target.name}.refined.tmp")
    shutil.copy2(refined, tmp)
    os.replace(tmp, target)
