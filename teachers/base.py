"""The `Denoiser` interface (docs/design.md §3).

Conventions (EDM, Karras et al. 2022):
- data lives in [-1, 1] (images) with sigma_data = 0.5; the forward process is x_t = x_0 + σ·ε;
- `D(x, sigma, labels)` returns the estimate of E[x_0 | x_t = x] (the clean sample);
- `sigma` is a per-sample tensor of shape [N] (a float is broadcast);
- the score of the noisy marginal is s(x, σ) = (D(x, σ) − x) / σ²;
- `labels` are one-hot float tensors [N, label_dim], or None for unconditional models.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """A denoiser D(x; σ) in EDM form. Teachers never need gradients on their weights."""

    data_shape: tuple[int, ...]  # shape of one sample, e.g. (3, 32, 32) or (2,)
    label_dim: int  # 0 = unconditional
    sigma_min: float
    sigma_max: float
    sigma_data: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None
                 ) -> torch.Tensor: ...


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Per-sample σ of shape [N] in x's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


def score(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor,
          labels: torch.Tensor | None = None) -> torch.Tensor:
    """∇_x log p_σ(x) = (D(x, σ) − x) / σ²  (Karras et al. 2022, eq. 3)."""
    sigma = as_sigma(sigma, x)
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (denoiser(x, sigma, labels) - x) / s**2
