"""A one-step MLP generator for vector data (toy problems): x = MLP(z), z ~ N(0, I)."""

from __future__ import annotations

import os

import torch
from torch import nn

from fileformats.atomic import atomic_open


class MLPGenerator(nn.Module):
    """Implements the `Generator` interface for unconditional vector data of dimension `dim`."""

    def __init__(self, dim: int = 2, z_dim: int = 4, hidden: int = 128, layers: int = 3):
        super().__init__()
        self.z_dim, self.c_dim, self.data_shape = z_dim, 0, (dim,)
        widths = [z_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], dim))

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=generator)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> None:
        return None

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_open(path) as f:
            torch.save({"state_dict": self.state_dict(), "z_dim": self.z_dim, "dim": self.data_shape[0]}, f)
