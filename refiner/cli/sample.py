"""`refiner sample`: draw images from an EDM teacher with the EDM sampler (Heun, Karras σ schedule)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import click
import numpy as np
import torch

from common.devices import resolve_device
from common.errors import UserError
from fileformats import nvpickle
from fileformats.atomic import atomic_open
from fileformats.progress import Progress
from fileformats.torchfiles import is_torch_checkpoint
from gan_adapters.biggan import is_biggan_folder
from gan_adapters.loader import load_generator
from gan_adapters.onestep import METADATA_KEY, onestep_from_snapshot
from metrics.images import image_grid, quantize
from refiner.cli.options import (
    BATCH,
    DEVICE,
    FINITE_FLOAT,
    fetch_source,
    given_options,
    resolution_option,
    sha256_option,
    threads_option,
)
from teachers.edm_loader import teacher_from_pickle
from teachers.sampler import SamplerConfig, SeededNoise, edm_sample

GRID_NAME = "grid.png"
NPZ_NAME = "samples.npz"
MAX_SEED = 2**32 - 1  # each image's noise comes from torch.Generator().manual_seed(seed mod 2**32), as in EDM
DEFAULT_STEPS = 18  # EDM's CIFAR-10 setting
MAX_IMAGES = 1_000_000  # images per call, all held in memory for samples.npz and the grid


def parse_seeds(text: str) -> list[int]:
    """'0-63' or '1,5,10-12' -> the listed integers in [0, MAX_SEED] (ranges inclusive), in order; at most
    MAX_IMAGES of them."""
    ranges = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UserError(f"--seeds {text!r}: cannot read {part!r}; "
                            "write numbers and ranges like 0-63 or 1,5,10-12")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"--seeds {text!r}: range {part!r} runs backwards; write it as {hi}-{lo}")
        if hi > MAX_SEED:
            raise UserError(f"--seeds {text!r}: {hi} is over the largest seed {MAX_SEED} (2**32 - 1)")
        ranges.append(range(lo, hi + 1))
    count = sum(len(r) for r in ranges)
    if count > MAX_IMAGES:
        raise UserError(f"--seeds {text!r} asks for {count:,} images; one call draws at most {MAX_IMAGES:,} "
                        "(all are kept in memory): split the seeds over several calls")
    return [seed for r in ranges for seed in r]


def check_memory(count: int, shape: tuple[int, ...]) -> None:
    """Refuse when `count` uint8 images of `shape` (held twice: the images and their grid) exceed the memory
    available now."""
    import psutil

    need = 2 * count * math.prod(shape)
    available = psutil.virtual_memory().available
    if need > available:
        fit = available // (2 * math.prod(shape))
        raise UserError(f"--seeds asks for {count:,} images of {'x'.join(map(str, shape))}: about "
                        f"{need / 2**30:.1f} GiB in memory, more than the {available / 2**30:.1f} GiB available; "
                        f"draw at most {fit:,} per call")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> uint8 NHWC, quantised as NVIDIA's code saves images (`metrics.images.quantize`)."""
    return quantize(x).permute(0, 2, 3, 1).cpu().numpy()


def one_hot(classes: torch.Tensor, label_dim: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes, label_dim).to(torch.float32)


@click.command("sample")
@click.option("--teacher", "source", required=True,
              help="EDM or EDM2 network pickle, or a one-step generator (sampled in one step; a state dict or a DMD2 "
                   "checkpoint folder): path or URL.")
@sha256_option("teacher")
@click.option("--seeds", default="0-63", show_default=True,
              help="Seeds, e.g. 0-63 or 1,5,10-12 (one image each).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help=f"Output folder for {GRID_NAME} and {NPZ_NAME} (existing files are not overwritten).")
@click.option("--steps", default=None, type=click.IntRange(min=2, max=10000),
              help=f"Sampler steps N of a teacher (2N-1 network evaluations; EDM uses {DEFAULT_STEPS} for CIFAR-10, "
                   f"40 for ImageNet-64) [default: {DEFAULT_STEPS}]. A one-step generator takes none.")
@click.option("--class", "class_idx", type=int, default=None,
              help="Class index for a conditional teacher (default: a random class per seed).")
@click.option("--batch", default=64, show_default=True, type=BATCH, help="Images per batch.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--sigma-init", type=FINITE_FLOAT, default=None,
              help="Sample the file in one step as G(z) = D(σ_init·z; σ_init): a one-step generator without "
                   "refiner's metadata (Diff-Instruct 1.0, SiD 2.5, DMD2 80). refiner's distill snapshots "
                   "are sampled in one step without it.")
@resolution_option
@threads_option
def command(source: str, teacher_sha256: str | None, seeds: str, out_dir: Path, steps: int | None,
            class_idx: int | None,
            batch: int, device: str, sigma_init: float | None, resolution: int | None) -> None:
    """Sample images from an EDM teacher (or a one-step generator); writes an image grid and an .npz of
    uint8 images.

    The .npz holds 'x' (uint8, NHWC, quantised as (x*127.5+128).clamp(0,255)), 'seeds' and, for a
    conditional teacher, 'labels' (class indices). Each image depends only on its seed.
    """
    seed_list = parse_seeds(seeds)
    outputs = [out_dir / GRID_NAME, out_dir / NPZ_NAME]
    for path in outputs:
        if path.exists():
            raise UserError(f"{path} already exists; choose another --out folder "
                            "(files are never overwritten)")
    dev = resolve_device(device)
    path = fetch_source(source, teacher_sha256, "teacher")
    if is_biggan_folder(path):
        raise UserError(f"{source} is a BigGAN-deep folder: a GAN, which `sample` does not draw; measure it with "
                        "`refiner metrics --generator`, or refine it with `refiner refine`")
    one_step_file = os.path.isdir(path) or is_torch_checkpoint(str(path))  # a DMD2 folder or a state dict
    data = None if one_step_file else nvpickle.load(path)
    if data is None:  # a published one-step generator's state dict (DMD2, consistency models): one step
        generator = load_generator(path, dev, **given_options(sigma_init=sigma_init, resolution=resolution))
        teacher, label_dim, shape = None, generator.c_dim, generator.data_shape
    elif resolution is not None:
        raise UserError("--resolution applies to consistency-model state dicts only; leave it out")
    elif sigma_init is not None or isinstance(data, dict) and METADATA_KEY in data:  # one step: D(σ_init·z; σ_init)
        generator = onestep_from_snapshot(data, str(source), dev, **given_options(sigma_init=sigma_init))
        teacher, label_dim = None, generator.c_dim
        shape = generator.data_shape
    else:
        teacher = teacher_from_pickle(data, str(source), dev)
        label_dim, shape = teacher.label_dim, teacher.data_shape
    check_memory(len(seed_list), tuple(shape))
    if class_idx is not None and label_dim == 0:
        raise UserError("--class given but the teacher is unconditional; leave out --class")
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise UserError(f"--class {class_idx} is out of range; "
                        f"this teacher has classes 0 to {label_dim - 1}")
    if steps is not None and teacher is None:
        raise UserError(f"--steps applies to a teacher's sampler; {source} is a one-step generator, drawn in one step: "
                        "leave out --steps")
    cfg = SamplerConfig(num_steps=DEFAULT_STEPS if steps is None else steps)

    images, classes = [], []
    with torch.inference_mode(), Progress(len(seed_list), desc="sample", unit="img") as bar:
        for start in range(0, len(seed_list), batch):
            chunk = seed_list[start:start + batch]
            noise = SeededNoise(chunk, dev)
            latents = noise.randn(shape)
            labels = None
            if label_dim:
                idx = torch.full([len(chunk)], class_idx, device=dev) if class_idx is not None \
                    else noise.randint(label_dim)
                labels = one_hot(idx, label_dim)
                classes.append(idx.cpu().numpy())
            x = edm_sample(teacher, latents, labels, cfg, randn_like=noise.randn_like) if teacher is not None \
                else generator(latents, labels)
            images.append(to_uint8(x))
            bar.update(len(chunk))

    x = np.concatenate(images)
    arrays = dict(x=x, seeds=np.asarray(seed_list, dtype=np.int64))
    if classes:
        arrays["labels"] = np.concatenate(classes).astype(np.int64)
    with atomic_open(outputs[1]) as f:
        np.savez(f, **arrays)
    try:
        with atomic_open(outputs[0]) as f:
            image_grid(x.transpose(0, 3, 1, 2), keep_gray=True).save(f, format="PNG")
    except BaseException:  # both files or neither: this call wrote the .npz (it was refused if it existed)
        outputs[1].unlink(missing_ok=True)
        raise
    click.echo(f"wrote {len(x)} image{'s' * (len(x) != 1)}: {outputs[0]} and {outputs[1]}")
