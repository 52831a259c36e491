"""Exact teachers: the closed-form denoiser of an isotropic Gaussian mixture in any dimension.

Under the EDM forward process x_t = x_0 + σε with x_0 ~ Σ_k π_k N(μ_k, s_k² I), the noisy marginal is
Σ_k π_k N(μ_k, (s_k² + σ²) I) and the posterior mean (Tweedie) is

    D(x, σ) = Σ_k r_k(x, σ) · (μ_k + s_k² / (s_k² + σ²) · (x − μ_k)),
    r_k(x, σ) ∝ π_k N(x; μ_k, (s_k² + σ²) I)          (responsibilities, via log-sum-exp).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from teachers.base import as_sigma


class GaussianMixtureDenoiser(nn.Module):
    """Exact EDM denoiser of Σ_k π_k N(μ_k, s_k² I). Implements the `Denoiser` interface."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor | float, weights: torch.Tensor | None = None,
                 sigma_min: float = 0.0, sigma_max: float = float("inf")):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, dim], got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float32).expand(k).clone()
        weights = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("stds must be positive and weights non-negative with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.data_shape = (means.shape[1],)
        self.label_dim = 0
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        # σ_data of the mixture: per-coordinate std of the data, √(E‖x − E x‖² / dim).
        mean = (self.weights[:, None] * means).sum(0)
        var = (self.weights * (stds**2 + ((means - mean) ** 2).mean(1))).sum()
        self.sigma_data = float(var.sqrt())

    def log_responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log r_k(x, σ), shape [N, K]."""
        dim = x.shape[1]
        stds, means, weights = (t.to(x.dtype) for t in (self.stds, self.means, self.weights))
        var = stds[None, :] ** 2 + sigma[:, None] ** 2  # [N, K]
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # [N, K]
        log_p = torch.log(weights)[None] - 0.5 * sq / var - 0.5 * dim * torch.log(2 * math.pi * var)
        return log_p - torch.logsumexp(log_p, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        x64 = x.double()
        sigma = as_sigma(sigma, x64)
        r = self.log_responsibilities(x64, sigma).exp()  # [N, K]
        means, s2 = self.means.double(), self.stds.double() ** 2
        shrink = s2[None, :] / (s2[None, :] + sigma[:, None] ** 2)  # [N, K]
        per_k = means[None] + shrink[..., None] * (x64[:, None, :] - means[None])  # [N, K, dim]
        return (r[..., None] * per_k).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws from the mixture."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.data_shape[0], generator=generator)
        return self.means[k] + self.stds[k, None] * eps


def ring(modes: int = 8, radius: float = 1.0, std: float = 0.05) -> GaussianMixtureDenoiser:
    """`modes` equal Gaussians evenly spaced on a circle."""
    angles = torch.arange(modes) * (2 * math.pi / modes)
    return GaussianMixtureDenoiser(radius * torch.stack([angles.cos(), angles.sin()], 1), std)


def grid(side: int = 5, spacing: float = 0.5, std: float = 0.05) -> GaussianMixtureDenoiser:
    """side×side equal Gaussians on a square grid centred at the origin."""
    ticks = (torch.arange(side) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(ticks, ticks)
    return GaussianMixtureDenoiser(means, std)
