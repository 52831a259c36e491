"""An EDM-preconditioned MLP denoiser for vector data: the fake-score network of toy problems.

D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) with EDM's coefficients (Karras et al. 2022,
Table 1; `teachers.edm_precond.edm_coefficients`); c_noise enters F through sinusoidal features.
"""

from __future__ import annotations

import torch
from torch import nn

from teachers.base import as_sigma
from teachers.edm_precond import edm_coefficients


class MLPDenoiser(nn.Module):
    """Implements the `Denoiser` interface for vector data of dimension `dim`."""

    def __init__(self, dim: int = 2, sigma_data: float = 0.5, hidden: int = 128, layers: int = 3,
                 noise_features: int = 16):
        super().__init__()
        self.data_shape, self.label_dim = (dim,), 0
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, 0.0, float("inf")
        self.register_buffer("freqs", torch.arange(noise_features // 2, dtype=torch.float32).exp2())
        widths = [dim + noise_features] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], dim))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = edm_coefficients(as_sigma(sigma, x)[:, None], self.sigma_data)
        angles = c_noise * self.freqs[None]
        emb = torch.cat([angles.cos(), angles.sin()], dim=1)
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, emb], dim=1))
