"""Noise-level samplers p(σ) for the loop (both losses draw σ from one of these)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from teachers.sampler import karras_schedule


@dataclass(frozen=True)
class LogNormalSigma:
    """EDM's training distribution: ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1; the official
    Diff-Instruct code uses it for both losses)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        return (torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean).exp()


@dataclass(frozen=True)
class KarrasGridSigma:
    """σ drawn uniformly from the Karras grid of `num` levels, restricted to the index range
    [min_percent, max_percent] of the grid (DMD2 uses 1000 levels and 2%..98%)."""

    num: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    min_percent: float = 0.0
    max_percent: float = 1.0

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        grid = karras_schedule(self.num, self.sigma_min, self.sigma_max, self.rho).float()
        lo, hi = int(self.min_percent * (self.num - 1)), int(self.max_percent * (self.num - 1))
        idx = torch.randint(lo, hi + 1, (n,), generator=generator, device=device)
        return grid.to(device)[idx]


SIGMA_SAMPLERS = {"lognormal": LogNormalSigma, "karras": KarrasGridSigma}
