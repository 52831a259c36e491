"""The Python API: what `refiner refine` does, from a script.

    from gan_adapters import load_generator
    from metrics import compute_metrics, load_detector
    from teachers import load_teacher
    import refiner

    teacher = load_teacher("edm-cifar10-32x32-uncond-vp.pkl")
    generator = load_generator("network-snapshot.pkl")            # StyleGAN2-ADA / StyleGAN3 / BigGAN-deep / one-step
    refined = refiner.train(generator, teacher, "runs/api", steps=100, batch=16, loss="ikl")
    refined.save("network-refined.pkl", overwrite=True)           # the input's own format
    print(compute_metrics(refined, load_detector(), "fid10k", ref="cifar10-32x32.npz"))

`train` runs the same loop, run directory (config.json, log.jsonl, checkpoints, grids, report.html) and
configuration path (job defaults → loss defaults → the options given) as the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from common.errors import UserError


def _check_networks(generator: Any, teacher: Any) -> None:
    """A UserError when `generator` / `teacher` are not loaded networks of their kinds: a path says which
    loader reads it, two networks in each other's place say so."""
    from gan_adapters.base import Generator
    from teachers.base import Denoiser

    loaders = {"generator": "gan_adapters.load_generator", "teacher": "teachers.load_teacher"}
    for name, value in (("generator", generator), ("teacher", teacher)):
        if isinstance(value, (str, os.PathLike)):
            raise UserError(f"refiner.train: {name} is a path ({os.fspath(value)!r}); load it first with "
                            f"{loaders[name]}(path)")
    if isinstance(teacher, Generator) and isinstance(generator, Denoiser) and not isinstance(generator, Generator):
        raise UserError("refiner.train: the generator and the teacher are in each other's place; call "
                        "train(generator, teacher, out)")
    for name, value, kind in (("generator", generator, Generator), ("teacher", teacher, Denoiser)):
        if not isinstance(value, nn.Module) or not isinstance(value, kind):
            raise UserError(f"refiner.train: {name} is a {type(value).__name__}, not a {name} network; load it with "
                            f"{loaders[name]}(path)")


def train(generator: nn.Module, teacher: nn.Module, out: str | os.PathLike, *, resume: bool = False,
          force: bool = False, echo=print, data: str | os.PathLike | None = None, **options: Any) -> nn.Module:
    """Refine `generator` (from `gan_adapters.load_generator`) with `teacher` (`teachers.load_teacher`)
    and return the refined generator (the EMA of its weights), whose `save` writes its own format.

    `out` is the run directory; `options` are the training options by their command-line names with
    underscores (`steps`, `batch`, `seed`, `lr`, `fake_lr`, `loss`, `alpha`, `sigma`, `p_mean`, `ema`,
    `snapshot_every`, `device`, ...; `refiner refine --help` lists them), with `refine`'s defaults. `data`: the
    real images that the losses with a discriminator read (`--data`: dmd2, sida, uni with fkl or js). The
    refined generator is also written to `out` at every snapshot, as `refine` does."""
    from common.devices import resolve_device
    from gan_adapters.writeback import writeback_for
    from refiner import distributed as dist
    from refiner.config import REFINE_DEFAULTS, TRAINING_KEYS, resolve_config
    from refiner.jobs import ImageJob, check_compatible, trainable_copy
    from refiner.realdata import check_data_option, open_real_data

    unknown = sorted(set(options) - set(TRAINING_KEYS))
    if unknown:
        raise UserError(f"refiner.train: unknown options {unknown}; the training options are {sorted(TRAINING_KEYS)}"
                        " and data")
    _check_networks(generator, teacher)
    config = resolve_config(REFINE_DEFAULTS, options)
    check_data_option(config.loss, None if data is None else os.fspath(data), config.loss_options)
    device = dist.setup(resolve_device(config.device))
    check_compatible(generator, teacher, type(generator).__name__, type(teacher).__name__)
    real_data = None if data is None else open_real_data(data, teacher.data_shape, teacher.label_dim)
    job = ImageJob(config, generator.to(device).train(), teacher.to(device), trainable_copy(teacher), Path(out),
                   device, writeback_for(generator), title="Diff-Instruct refinement of a GAN", echo=echo,
                   real_data=real_data)
    job.run(resume=resume, force=force)
    return job.ema
