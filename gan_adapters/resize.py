"""Resolution bridge: refine a generator with a teacher trained at a lower resolution.

`Resized(gen, 64)` makes a 128 px generator look like a 64 px one to the loop: its images are area-
downsampled (the mean of each 2x2 block), which is differentiable, so gradients from the 64 px teacher reach
every parameter of the full-resolution generator. Saving writes the wrapped generator unchanged in format
and resolution.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError


def area_factor(height: int, width: int, size: int) -> int:
    """The whole factor f with height = width = f · size; UserError if there is none."""
    if height != width or size < 1 or height % size != 0:
        raise UserError(f"cannot area-downsample {height}x{width} images to {size}x{size}: the generator's "
                        f"resolution must be a whole multiple of the teacher's (e.g. 128 -> 64 or 32); use a "
                        f"teacher whose resolution divides {height}")
    return height // size


def area_downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images [N, C, H, W] -> [N, C, size, size]: the mean of each non-overlapping f x f block, f = H / size.
    Only whole factors are supported (see `area_factor`)."""
    factor = area_factor(x.shape[-2], x.shape[-1], size)
    return x if factor == 1 else F.avg_pool2d(x, factor)


class Resized(nn.Module):
    """A `Generator` (gan_adapters/base.py) whose images are `gen`'s, area-downsampled to `resolution`."""

    def __init__(self, gen: nn.Module, resolution: int):
        super().__init__()
        channels, height, width = gen.data_shape
        area_factor(height, width, resolution)
        self.gen = gen
        self.z_dim = gen.z_dim
        self.c_dim = gen.c_dim
        self.resolution = resolution
        self.channels = channels
        self.data_shape = (channels, resolution, resolution)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.gen.sample_latents(n, generator)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        return self.gen.sample_labels(n, generator)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return area_downsample(self.gen(z, c), self.resolution)

    def save(self, path: str | os.PathLike, **kwargs) -> None:
        """The wrapped generator's own format, at its own resolution."""
        self.gen.save(path, **kwargs)
