"""Real samples for the adversarial losses (`--data`): the image sets `refiner metrics` reads (folders, NVIDIA
dataset zips with `dataset.json` labels, .npz of uint8 images; metrics.images) as batches in the loop's
convention, and the toy's target distribution.

A batch is drawn with the loop's seeded generator: the global batch's indices are drawn on every process
and each keeps its own slice (as the loop does with latents), so a run and its resume read the same images.
Images are sampled with replacement, uniformly (DMD2 and SiDA shuffle an infinite loader; uniform draws
agree with that in distribution and need no epoch state in the checkpoint).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import UserError
from metrics.images import ImageSet, open_image_set
from refiner.losses import GENERATOR_LOSSES, get_loss


class RealData(Protocol):
    """Real samples x (the teacher's data shape, images in [-1, 1]) and one-hot labels (or None)."""

    def draw(self, n: int, generator: torch.Generator, part: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw `n` samples with `generator` (always consuming the same random numbers for `n`) and return
        the rows `part` of them."""
        ...


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [-1, 1]: x/127.5 − 1 (EDM's and SiDA's data scaling)."""
    return images.to(torch.float32) / 127.5 - 1


def area_resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Downsample square NCHW images by an integer factor, averaging each factor x factor block (box filter)."""
    factor = x.shape[-1] // resolution
    return x if factor == 1 else F.avg_pool2d(x, factor)


def one_hot_labels(raw: np.ndarray, classes: int, where: str) -> torch.Tensor:
    """dataset.json labels (class indices, or rows of `classes` values) -> one-hot float [N, classes]."""
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] == classes:
        return torch.from_numpy(raw.astype(np.float32))
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
        raise UserError(f"{where}: dataset.json labels must be class indices (integers) or rows of {classes} "
                        f"values; found an array of shape {list(raw.shape)} and type {raw.dtype}")
    if raw.min() < 0 or raw.max() >= classes:
        raise UserError(f"{where}: labels range over {int(raw.min())}..{int(raw.max())} but the teacher has "
                        f"{classes} classes (0..{classes - 1}); use data labelled for this teacher")
    return F.one_hot(torch.from_numpy(raw.astype(np.int64)), classes).to(torch.float32)


class ImageData:
    """An image set fitted to a teacher of shape (channels, resolution, resolution) with `classes` labels.

    Everything that can be checked without reading every image is checked here, so a mismatch stops the
    command before it writes anything: readable first image, square size that an integer area downsampling
    takes to the teacher's resolution, channels, labels for a conditional teacher."""

    def __init__(self, images: ImageSet, data_shape: tuple[int, ...], classes: int):
        self.images, self.classes = images, classes
        self.channels, self.resolution = data_shape[0], data_shape[-1]
        where = str(images.path)
        first = next(images.batches(1, [0]))
        h, w = first.shape[-2:]
        if h != w or h % self.resolution:
            hint = "" if h == w and h > self.resolution else "; resize them to it (or to a multiple of it) first"
            raise UserError(f"{where}: images are {w}x{h} and cannot be area-downsampled to the teacher's "
                            f"{self.resolution}x{self.resolution} (needs square images whose size is a multiple "
                            f"of {self.resolution}){hint}")
        if self.channels == 1 and not bool((first == first[:, :1]).all()):
            raise UserError(f"{where}: images are in colour but the teacher has one channel; give grayscale images")
        if self.channels not in (1, 3):
            raise UserError(f"{where}: the teacher has {self.channels} channels; --data gives images with 1 or 3")
        self.labels: torch.Tensor | None = None
        if classes:
            if images.labels is None:
                raise UserError(f"{where}: the teacher is conditional ({classes} classes) but the data has no "
                                "labels; give a dataset zip or folder with dataset.json labels")
            self.labels = one_hot_labels(images.labels, classes, where)

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, n: int, generator: torch.Generator, part: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = torch.randint(len(self), (n,), generator=generator)[part]
        batch = next(self.images.batches(len(indices), indices.tolist()))
        x = area_resize(to_model_range(batch[:, :self.channels]), self.resolution)
        return x, None if self.labels is None else self.labels[indices]


class TensorData:
    """Images already in memory in the model's convention (float NCHW in [-1, 1]) with one-hot labels or None."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels

    def draw(self, n: int, generator: torch.Generator, part: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = torch.randint(len(self.images), (n,), generator=generator)[part]
        return self.images[indices], None if self.labels is None else self.labels[indices]


class TargetData:
    """The toy's real data: samples of the target distribution itself (an exact teacher with `.sample`)."""

    def __init__(self, target):
        self.target = target

    def draw(self, n: int, generator: torch.Generator, part: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.target.sample(n, generator)[part], None


def open_real_data(path: str | os.PathLike, data_shape: tuple[int, ...], classes: int) -> ImageData:
    """`--data` for a teacher with `data_shape` (C, H, W) and `classes` labels (0 = unconditional);
    a UserError in one line when it cannot be read or does not fit."""
    if len(data_shape) != 3:
        raise UserError(f"--data gives images but the teacher's samples have shape {list(data_shape)}")
    return ImageData(open_image_set(path), tuple(data_shape), classes)


def _readers() -> str:
    """The losses (and options) that read real images, for messages."""
    names = [name for name, s in GENERATOR_LOSSES.items() if s.needs_data]
    names += [f"{name} --divergence fkl|js" for name, s in GENERATOR_LOSSES.items() if s.discriminator_when]
    return ", ".join(names)


def require_data(loss: str, data: object | None, options: dict[str, Any] | None = None) -> None:
    """A UserError when loss `loss` with its `options` trains a discriminator on real samples and none are
    given (`data`: the --data path or the opened data)."""
    spec = get_loss(loss)
    if spec.uses_data(options) and data is None:
        what = f"--loss {loss}" + ("" if spec.needs_data else " with " + ", ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in spec.resolve(options or {}).items()))
        raise UserError(f"{what} trains a discriminator on real images: give them with --data (an image "
                        "folder, a dataset .zip with dataset.json labels, or an .npz of uint8 images)")


def check_data_option(loss: str, path: str | None, options: dict[str, Any] | None = None) -> None:
    """--data must be given exactly when the loss (with its options) reads real images."""
    require_data(loss, path, options)
    if path is not None and not get_loss(loss).uses_data(options):
        raise UserError(f"--data is read by the losses that train a discriminator ({_readers()}) only and this "
                        f"run uses --loss {loss}; drop --data or choose one of them")
