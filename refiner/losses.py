"""The losses of the Diff-Instruct loop, as small pure functions (DESIGN.md §4).

Notation: x = G(z, c) a generator sample, σ a per-sample noise level, x_t = x + σε,
D_r = teacher(x_t, σ, c), D_f = fake(x_t, σ, c) computed without gradients. Scores are s = (D − x_t)/σ².
"""

from __future__ import annotations

from typing import Callable

import torch


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²  (Karras et al. 2022, eq. 8 / Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_data: float
                   ) -> torch.Tensor:
    """Fake-score (denoising score matching) loss in EDM form, summed over the sample's elements and
    averaged over the batch:  L(φ) = E λ(σ) ‖D_φ(x_0 + σε, σ) − x_0‖²  (Diff-Instruct Alg. 1, EDM eq. 2).
    `x0` must be detached (the generator gets no gradient from this loss)."""
    w = _per_sample(edm_weight(sigma, sigma_data), x0)
    return (w * (denoised - x0) ** 2).flatten(1).sum(1).mean()


def ikl_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, sigma: torch.Tensor
             ) -> torch.Tensor:
    """Diff-Instruct generator surrogate (Luo et al. 2023, Thm 3.1, with w(t) = σ² in score space):

        L(θ) = (1/N) Σ_n ⟨sg[D_f − D_r], x_n⟩,   so  ∇_θ L = (1/N) Σ_n (D_f − D_r)ᵀ ∂x_n/∂θ
             = (1/N) Σ_n σ² (s_f − s_r)ᵀ ∂x_t/∂θ.
    This is exactly the official code's `gloss` (weight 1 on the denoiser difference)."""
    g = (d_fake - d_real).detach()
    return (g * x).flatten(1).sum(1).mean()


def dmd_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """DMD / DMD2 (Yin et al. 2024) distribution-matching gradient: the IKL direction divided per sample
    by mean_{CHW} |x − D_r| (edm_guidance.py of DMD2):  g = (D_f − D_r) / mean|x − D_r|,
    L = ⟨sg[g], x⟩ / N  (same gradient as DMD2's 0.5·‖x − sg[x − g]‖² up to their mean-vs-sum scaling)."""
    norm = (x - d_real).detach().abs().flatten(1).mean(1).clamp_min(1e-8)
    g = (d_fake - d_real).detach() / _per_sample(norm, x)
    return (g * x).flatten(1).sum(1).mean()


GeneratorLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

GENERATOR_LOSSES: dict[str, GeneratorLoss] = {"ikl": ikl_loss, "dmd": dmd_loss, "dmd2": dmd_loss}


def add_noise(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = x + σε (EDM / VE forward process)."""
    return x + _per_sample(sigma, x) * noise


def generator_loss(name: str) -> GeneratorLoss:
    try:
        return GENERATOR_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown generator loss {name!r}; choose one of {sorted(GENERATOR_LOSSES)}") from None

