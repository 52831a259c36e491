"""The EDM sampler (Karras et al. 2022, Algorithm 2): Heun's 2nd-order method on the probability-flow
ODE dx/dσ = (x − D(x; σ)) / σ, with optional stochastic "churn", on the σ schedule

    σ_i = (σ_max^(1/ρ) + i/(N−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,  i < N,  σ_N = 0      (eq. 5)

Works with any `Denoiser` (EDM networks, analytic teachers). Defaults are generate.py's; σ_min/σ_max
are clamped to the denoiser's range and rounded by its `round_sigma` where it has one (iDDPM).
The state is kept in float64, as the original does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from teachers.base import Denoiser, as_sigma


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0


def round_sigma(denoiser: Denoiser, sigma: torch.Tensor) -> torch.Tensor:
    """The denoiser's nearest supported σ (identity if it has no `round_sigma`)."""
    fn = getattr(denoiser, "round_sigma", None)
    return fn(sigma).to(sigma) if fn is not None else sigma


def karras_schedule(num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras et al. 2022 eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..N−1,
    descending, float64, without the trailing σ = 0."""
    i = torch.arange(num, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / max(num - 1, 1) * (lo - hi)) ** rho


def karras_sigmas(denoiser: Denoiser, cfg: SamplerConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """σ_0 > … > σ_{N−1} (eq. 5, clamped to the denoiser's range, rounded), then σ_N = 0: [N+1] float64."""
    if cfg.num_steps < 2:
        raise ValueError(f"the EDM schedule needs num_steps >= 2, got {cfg.num_steps}")
    sigmas = karras_schedule(cfg.num_steps, max(cfg.sigma_min, denoiser.sigma_min),
                             min(cfg.sigma_max, denoiser.sigma_max), cfg.rho, device)
    return torch.cat([round_sigma(denoiser, sigmas), torch.zeros_like(sigmas[:1])])


class SeededNoise:
    """Per-sample random streams, one torch.Generator per seed (like EDM's generate.py): sample i's
    latents, label and churn noise depend only on seeds[i], not on the batch it is drawn in."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(list(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], x.dtype)

    def randint(self, high: int) -> torch.Tensor:
        return torch.stack([torch.randint(high, [], generator=g, device=self.device)
                            for g in self.generators])


def edm_sample(denoiser: Denoiser, latents: torch.Tensor, labels: torch.Tensor | None = None,
               cfg: SamplerConfig = SamplerConfig(),
               randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
    """Samples from standard-normal `latents` [N, ...] in 2N−1 denoiser calls; returns float64.

    Step i (σ = t_i → t_{i+1}): γ = min(S_churn/N, √2 − 1) if S_min ≤ t_i ≤ S_max else 0;
    t̂ = round(t_i(1 + γ)); x̂ = x + √(t̂² − t_i²)·S_noise·ε; d = (x̂ − D(x̂; t̂))/t̂;
    x' = x̂ + (t_{i+1} − t̂)·d; unless t_{i+1} = 0: x' = x̂ + (t_{i+1} − t̂)·(d + d')/2 with
    d' = (x' − D(x'; t_{i+1}))/t_{i+1}."""
    t_steps = karras_sigmas(denoiser, cfg, latents.device)

    def D(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, as_sigma(t, x), labels).to(torch.float64)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(cfg.S_churn / cfg.num_steps, math.sqrt(2) - 1) if cfg.S_min <= t_cur <= cfg.S_max else 0.0
        t_hat = round_sigma(denoiser, t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * cfg.S_noise * randn_like(x_cur)  # drawn every step
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < cfg.num_steps - 1:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
