"""`refiner distill`: distil an EDM teacher into a fresh one-step generator, data-free (the main experiment
of Diff-Instruct, Luo et al. 2023), on one CPU, one GPU or many GPUs (torchrun).

Under torchrun every process draws the global batch from the same seeded generator and keeps its slice,
so N processes follow the run of one; only dropout masks (each process's own RNG) differ, so with
dropout > 0 they agree in distribution rather than bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from common.errors import UserError
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
from refiner.config import TrainConfig, input_name
from refiner.losses import get_loss
from refiner.presets import DEFAULT, PRESETS, Preset, get_preset, presets_help
from refiner.realdata import check_data_option, open_real_data

# The defaults that --help shows: the default preset's (a --preset and the loss's defaults replace them).
_HELP_DEFAULTS = TrainConfig(**{**DEFAULT.train_values(), "steps": None, "snapshot_every": None})  # type: ignore[arg-type]

MAX_GRID = 1024  # images in one grid of fixed seeds (each snapshot's grid is drawn and held in memory)


@click.command("distill", epilog=presets_help())
@click.option("--teacher", "teacher_src", required=True,
              help="EDM or EDM2 network pickle (its `ema`), e.g. edm-cifar10-32x32-uncond-vp.pkl: path or URL.")
@sha256_option("teacher")
@click.option("--preset", "preset_name", metavar="NAME", default=None,
              help=f"Published recipe: {', '.join(PRESETS)} (values below). Default: Diff-Instruct's "
                   "CIFAR-10 values, bf16 on GPUs that have it.")
@click.option("--sigma-init", type=FINITE_FLOAT, default=None,
              help="σ_init of the generator G(z) = D(σ_init·z; σ_init) [the loss's: 2.5 for sid, sim, uni; else "
                   "the preset's].")
@click.option("--dropout", type=FINITE_FLOAT, default=None,
              help="Dropout of the generator and the fake-score network while they train, and of the teacher "
                   "with --teacher-mode train-shared-dropout (the official code builds all three with it) [preset].")
@click.option("--kimg", type=FINITE_FLOAT, default=None,
              help="Training length in thousands of generator images [preset]; --steps counts updates instead.")
@click.option("--snapshot-kimg", type=FINITE_FLOAT, default=None,
              help="Thousands of images between snapshots [preset]; --snapshot-every counts updates instead.")
@click.option("--grid-seeds", type=click.IntRange(1, MAX_GRID), default=64, show_default=True,
              help="Images in the grids of fixed seeds.")
@click.option("--teacher-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Teacher precision on CUDA (default: --precision; with fp32, what the file says).")
@click.option("--init", "init_src", default=None, metavar="FILE",
              help="Start the generator from this one-step generator instead of the teacher's copy: a distill "
                   "snapshot, a Diff-Instruct / SiD snapshot (with --sigma-init), a DMD2 or consistency-model "
                   "state dict (σ_init 80 unless --sigma-init says otherwise).")
@resolution_option
@threads_option
@data_option
@source_options
@metric_options
@training_options(_HELP_DEFAULTS)
def command(teacher_src: str, teacher_sha256: str | None, preset_name: str | None, sigma_init: float | None,
            dropout: float | None, kimg: float | None, snapshot_kimg: float | None, grid_seeds: int,
            teacher_dtype: str | None, init_src: str | None, resolution: int | None, metrics_at_snapshots: bool,
            data_src: str | None,
            unknown_source: str, source_from: str | None, **kwargs: Any) -> None:
    """Distil an EDM teacher into a one-step generator with Diff-Instruct (data-free).

    The generator is a copy of the teacher's network used as G(z, c) = D(σ_init·z; σ_init, c). Every
    snapshot writes a checkpoint and OUT/network-snapshot-NNNNNNNNN.pkl (NNNNNNNNN = images seen): {'ema': the
    generator's EMA as the teacher file's network class, with its module source} that EDM, Diff-Instruct
    and SiD code load; plus grid-NNNNNNNNN.png of fixed seeds. At the end: grid-before/after.png,
    log.jsonl and report.html. Several GPUs: torchrun --nproc_per_node N -m refiner distill ...
    """
    from common.devices import resolve_device
    from gan_adapters.loader import load_generator
    from gan_adapters.onestep import OneStepGenerator, set_dropout
    from gan_adapters.writeback import writeback_for
    from refiner.jobs import ImageJob, check_compatible, trainable_copy
    from teachers.edm_loader import load_teacher

    preset = get_preset(preset_name)
    out, resume, force = run_options(kwargs)
    dropout = preset.dropout if dropout is None else dropout
    if dropout is not None and not 0 <= dropout < 1:
        raise UserError(f"--dropout must lie in [0, 1) (got {dropout})")
    config = distill_config(preset, kwargs, kimg, snapshot_kimg, teacher=input_name(teacher_src), preset=preset.name,
                            dropout=dropout, teacher_dtype=teacher_dtype, data=input_name(data_src))
    check_data_option(config.loss, data_src, config.loss_options)
    if resolution is not None and init_src is None:
        raise UserError("--resolution applies to --init (a consistency-model state dict); leave it out")
    given_sigma_init = sigma_init
    sigma_init, config.sources["extra.sigma_init"] = resolve_sigma_init(sigma_init, preset, config.loss)
    config.extra["sigma_init"] = sigma_init
    device = dist.setup(resolve_device(config.device))
    config = config.for_device(device)  # precision auto -> bf16 or fp32, before the teacher's dtype follows it
    inputs = command_inputs(kwargs, teacher_src, init_src, data_src, source_from)
    evaluate = make_evaluator(kwargs, device)  # a bad --ref or --detector is refused before the networks load
    main = dist.rank() == 0
    echo = (lambda s: click.echo(s, err=True)) if main else (lambda s: None)
    default_dtype = None if config.precision == "fp32" else config.precision
    teacher = load_teacher(fetch_source(teacher_src, teacher_sha256, "teacher"), device=device,
                           dtype=teacher_dtype or default_dtype)
    check_sources(teacher.record, teacher_src, unknown_source, source_from, echo)
    if preset.shape is not None and (teacher.data_shape[-1], teacher.label_dim) != preset.shape:
        echo(f"warning: preset {preset.name} is made for a {preset.shape[0]}x{preset.shape[0]} teacher with "
             f"{preset.shape[1]} classes; this one is {teacher.data_shape[-1]}x{teacher.data_shape[-1]} with "
             f"{teacher.label_dim} classes")
    real_data = None if data_src is None else open_real_data(data_src, teacher.data_shape, teacher.label_dim)
    if init_src is None:
        generator = OneStepGenerator.from_teacher(teacher, sigma_init, teacher_src)
    else:  # a published or earlier one-step generator: its own σ_init unless --sigma-init is given
        generator = load_generator(fetch_source(init_src, None, "init"), device=device,
                                   **given_options(sigma_init=given_sigma_init, resolution=resolution))
        if not isinstance(generator, OneStepGenerator):
            raise UserError(f"--init {init_src} holds a {type(generator).__name__}, not a one-step EDM-family "
                            "generator; refine a GAN with `refiner refine --generator`")
        check_compatible(generator, teacher, init_src, teacher_src)
        config.extra["sigma_init"], config.sources["extra.sigma_init"] = generator.sigma_init, "init"
        config.extra["init"] = input_name(init_src)
        if resolution is not None:
            config.extra["resolution"] = resolution
    fake = trainable_copy(teacher, config.augment > 0)
    if dropout is not None:
        for network in (generator, fake, teacher):  # the teacher's only matters in train-shared-dropout mode
            set_dropout(network, dropout)
    echo(f"generator: {generator.describe()}")
    job = ImageJob(config, generator.train(), teacher, fake, Path(out), device,
                   writeback_for(generator, snapshots=True),
                   evaluate=evaluate, metrics_at_snapshots=metrics_at_snapshots, grid_seeds=grid_seeds,
                   snapshot_grids=True,
                   title="Diff-Instruct distillation of an EDM teacher into a one-step generator",
                   info={"teacher": teacher_src, "preset": preset.name, "sigma_init": generator.sigma_init,
                         "processes": dist.world_size()}, echo=echo, inputs=inputs, real_data=real_data)
    result = job.run(resume=resume, force=force)
    if main:
        click.echo(json.dumps(result))


def distill_config(recipe: Preset, kwargs: dict[str, Any], kimg: float | None, snapshot_kimg: float | None,
                   **extra: Any) -> TrainConfig:
    """The run's TrainConfig: defaults → the preset → the loss's defaults → the options given. Durations
    given in kimg become steps at the batch size used; --steps / --snapshot-every exclude --kimg /
    --snapshot-kimg."""
    for steps_option, kimg_option, value in (("steps", "kimg", kimg), ("snapshot_every", "snapshot_kimg",
                                                                        snapshot_kimg)):
        if kwargs[steps_option] is not None and value is not None:
            raise UserError(f"--{steps_option.replace('_', '-')} and --{kimg_option.replace('_', '-')} "
                            "both set the same length; give one of them")
        if value is not None and value < 0:
            raise UserError(f"--{kimg_option.replace('_', '-')} must be >= 0 (got {value:g})")
    batch = recipe.batch if kwargs["batch"] is None else kwargs["batch"]
    if batch < 1:
        raise UserError(f"--batch must be >= 1 (got {batch})")
    if kimg is not None:
        kwargs["steps"] = recipe.steps(kimg, batch)
    if snapshot_kimg is not None:
        kwargs["snapshot_every"] = recipe.steps(snapshot_kimg, batch)
    return config_from_options(TrainConfig(), kwargs, recipe.train_values(batch), **extra)


def resolve_sigma_init(given: float | None, recipe: Preset, loss: str) -> tuple[float, str]:
    """σ_init of the generator and where it came from: --sigma-init, else the loss's (SiD-family losses: 2.5),
    else the preset's."""
    if given is not None:
        return given, "user"
    own = get_loss(loss).sigma_init
    if own is not None:
        return own, f"loss {loss}"
    return recipe.sigma_init, "preset"
