"""`refiner refine`: refine a GAN (StyleGAN2-ADA pickle) with Diff-Instruct and write it back in its own
format, so the user's own code loads it unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from refiner import distributed as dist
from refiner.cli.options import (
    FINITE_FLOAT,
    command_inputs,
    config_from_options,
    data_option,
    fetch_source,
    given_options,
    make_evaluator,
    metric_options,
    resolution_option,
    run_options,
    sha256_option,
    threads_option,
    training_options,
)
from refiner.cli.source_options import check_sources, source_options
from refiner.config import REFINE_DEFAULTS, input_name
from refiner.realdata import check_data_option, open_real_data


@click.command("refine")
@click.option("--generator", "generator_src", required=True,
              help="StyleGAN2-ADA network pickle (network-snapshot-*.pkl, path or URL) or a BigGAN-deep "
                   "folder (config.json + pytorch_model.bin).")
@sha256_option("generator")
@click.option("--teacher", "teacher_src", required=True,
              help="EDM or EDM2 network pickle (its `ema`): path or URL.")
@sha256_option("teacher")
@click.option("--trainable", type=click.Choice(["all", "synthesis", "mapping-frozen"]), default=None,
              help="StyleGAN2-ADA: which weights train (default all); mapping-frozen = synthesis incl. style "
                   "affines; synthesis = synthesis convolutions only (the styles of a z are kept).")
@click.option("--noise-mode", type=click.Choice(["random", "const", "none"]), default=None,
              help="StyleGAN2-ADA: per-pixel noise during training (default random = what metrics sample).")
@click.option("--truncation", type=FINITE_FLOAT, default=None,
              help="BigGAN-deep: truncation of the prior and batch-norm statistics (default 1.0).")
@click.option("--sigma-init", type=FINITE_FLOAT, default=None,
              help="One-step EDM generator without refiner's metadata (a Diff-Instruct or SiD snapshot): its "
                   "G(z) = D(σ_init·z; σ_init); Diff-Instruct 1.0, SiD 2.5, DMD2 80.")
@resolution_option
@threads_option
@click.option("--resize-to-teacher", is_flag=True,
              help="Area-downsample the generator's images to the teacher's resolution (e.g. a 128 px "
                   "BigGAN refined by a 64 px teacher).")
@click.option("--keep-G", "keep_g", is_flag=True, help="Write the refined weights into G_ema only; keep G.")
@click.option("--in-place", is_flag=True,
              help="Replace the input (pickle or BigGAN-deep folder) once the refined one is written and "
                   "re-read; keeps the input as FILE.bak.")
@click.option("--teacher-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Teacher precision on CUDA (default: what the file says).")
@data_option
@source_options
@metric_options
@training_options(REFINE_DEFAULTS)
def command(generator_src: str, generator_sha256: str | None, teacher_src: str, teacher_sha256: str | None,
            trainable: str | None, noise_mode: str | None, truncation: float | None, sigma_init: float | None,
            resolution: int | None, resize_to_teacher: bool, keep_g: bool, in_place: bool, teacher_dtype: str | None,
            metrics_at_snapshots: bool, data_src: str | None, unknown_source: str, source_from: str | None,
            **kwargs: Any) -> None:
    """Refine a GAN (StyleGAN2-ADA, BigGAN-deep) with an EDM teacher, written back in its own format.

    Writes OUT/network-refined.pkl (StyleGAN2-ADA; loads in NVIDIA's code unchanged) or the folder
    OUT/biggan-refined (BigGAN-deep) at every snapshot and at the end, before/after grids of the same
    seeds, log.jsonl, checkpoints and report.html. StyleGAN2 truncation is off during training.
    """
    from common.devices import resolve_device
    from gan_adapters.loader import load_generator
    from gan_adapters.resize import Resized
    from gan_adapters.writeback import in_place_backup, replace_input, writeback_for
    from refiner.jobs import ImageJob, check_compatible, trainable_copy
    from teachers.edm_loader import load_teacher

    out, resume, force = run_options(kwargs)
    family_options = given_options(trainable=trainable, noise_mode=noise_mode, truncation=truncation,
                                   sigma_init=sigma_init, resolution=resolution)
    config = config_from_options(REFINE_DEFAULTS, kwargs, generator=input_name(generator_src),
                                 teacher=input_name(teacher_src), keep_G=keep_g, resize_to_teacher=resize_to_teacher,
                                 data=input_name(data_src), **family_options)
    check_data_option(config.loss, data_src, config.loss_options)
    device = dist.setup(resolve_device(config.device))
    inputs = command_inputs(kwargs, generator_src, teacher_src, data_src, source_from)
    evaluate = make_evaluator(kwargs, device)  # a bad --ref or --detector is refused before the networks load
    main = dist.rank() == 0
    backup = in_place_backup(generator_src) if in_place else None
    generator = load_generator(fetch_source(generator_src, generator_sha256, "generator"), device=device,
                               **family_options)
    check_sources(generator, generator_src, unknown_source, source_from, lambda s: click.echo(s, err=True))
    writer = writeback_for(generator, keep_G=keep_g)
    if in_place:
        writer.check_in_place(generator_src)
    teacher = load_teacher(fetch_source(teacher_src, teacher_sha256, "teacher"), device=device, dtype=teacher_dtype)
    if resize_to_teacher:
        generator = Resized(generator, teacher.data_shape[-1])
    check_compatible(generator, teacher, generator_src, teacher_src)
    real_data = None if data_src is None else open_real_data(data_src, teacher.data_shape, teacher.label_dim)
    fake = trainable_copy(teacher, config.augment > 0)
    job = ImageJob(config, generator.train(), teacher, fake, Path(out), device, writer, evaluate=evaluate,
                   metrics_at_snapshots=metrics_at_snapshots,
                   title="Diff-Instruct refinement of a GAN",
                   info={"generator": generator_src, "teacher": teacher_src},
                   echo=(lambda s: click.echo(s, err=True)) if main else (lambda s: None),
                   inputs=inputs, real_data=real_data)
    result = job.run(resume=resume, force=force)
    if not main:
        return
    if in_place:
        replace_input(Path(generator_src), job.output_path, backup, job.ema, family_options)
        result["in_place"] = generator_src
    click.echo(json.dumps(result))

