"""Noise-level samplers p(σ) for the loop, and their registry.

Each sampler is a frozen dataclass whose fields are its options; the field names are the `TrainConfig`
fields and (with '-' for '_') the command-line options that set them. `SIGMA_SAMPLERS` maps the
`--sigma` / `--fake-sigma` names to the classes; `sampler_options` lists what each one reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from teachers.sampler import karras_schedule


@dataclass(frozen=True)
class LogNormalSigma:
    """EDM's training distribution: ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1; the official
    Diff-Instruct code uses it for both losses, SiD for the fake-score loss)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        return (torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean).exp()


@dataclass(frozen=True)
class KarrasGridSigma:
    """σ drawn uniformly from the Karras grid of `levels` levels (Karras et al. 2022, eq. 5, descending),
    restricted to the index range [min_percent, max_percent]·(levels − 1) of the grid (DMD2,
    tianweiy/DMD2 main/edm/edm_guidance.py: 1000 levels, indices 20..980, i.e. 0.02..0.98)."""

    levels: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    min_percent: float = 0.0
    max_percent: float = 1.0

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        grid = karras_schedule(self.levels, self.sigma_min, self.sigma_max, self.rho).float()
        lo, hi = int(self.min_percent * (self.levels - 1)), int(self.max_percent * (self.levels - 1))
        idx = torch.randint(lo, hi + 1, (n,), generator=generator, device=device)
        return grid.to(device)[idx]


@dataclass(frozen=True)
class KarrasTimeSigma:
    """SiD's generator-loss noise (mingyuanzhou/SiD training/sid_loss.py, `generator_loss`): t ~ U[0, t_max/1000]
    continuous, σ = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i.e. the continuous Karras ρ=7
    schedule from σ_min (t = 0) up to its point t_max/1000 (t_max = 800: σ ≤ 24.5)."""

    t_max: float = 800.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        t = torch.rand(n, generator=generator, dtype=torch.float64) * (self.t_max / 1000)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((hi + (1 - t) * (lo - hi)) ** self.rho).float().to(device)


SIGMA_SAMPLERS = {"lognormal": LogNormalSigma, "karras": KarrasGridSigma, "karras-t": KarrasTimeSigma}

SAME = "same"  # --fake-sigma: the fake-score step draws σ as the generator step does


def sampler_options(name: str) -> tuple[str, ...]:
    """The option (field) names that sampler `name` reads."""
    return tuple(f.name for f in dataclasses.fields(SIGMA_SAMPLERS[name]))


ALL_SAMPLER_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for s in SIGMA_SAMPLERS for o in sampler_options(s)))


def check_sampler(name: str, options: dict) -> None:
    """Raise ValueError when the options do not make a valid sampler `name` (ranges, ordering)."""
    o = {**{f.name: f.default for f in dataclasses.fields(SIGMA_SAMPLERS[name])}, **options}
    checks = {
        "p_std": lambda: o["p_std"] > 0,
        "levels": lambda: o["levels"] >= 2,
        "sigma_min": lambda: 0 < o["sigma_min"] < o["sigma_max"],
        "rho": lambda: o["rho"] > 0,
        "min_percent": lambda: 0 <= o["min_percent"] <= o["max_percent"] <= 1,
        "t_max": lambda: 0 < o["t_max"] <= 1000,
    }
    messages = {"p_std": "--p-std must be > 0", "levels": "--levels must be >= 2",
                "sigma_min": "need 0 < --sigma-min < --sigma-max", "rho": "--rho must be > 0",
                "min_percent": "need 0 <= --min-percent <= --max-percent <= 1",
                "t_max": "--t-max must lie in (0, 1000]"}
    for key, ok in checks.items():
        if key in o and not ok():
            raise ValueError(f"{messages[key]} (sigma {name}: {o})")


def make_sampler(name: str, options: dict):
    """The sampler `name` with the given options (the ones it does not read are ignored here; the
    configuration refuses them before)."""
    return SIGMA_SAMPLERS[name](**{k: options[k] for k in sampler_options(name) if options.get(k) is not None})
