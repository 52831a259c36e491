"""The EDM sampler on an exact Gaussian teacher: Heun steps against the scalar recursion of the linear
probability-flow ODE, sample moments against the target within Monte Carlo error, the σ schedule
against eq. 5, and per-seed noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from teachers.analytic import GaussianMixtureDenoiser
from teachers.sampler import SamplerConfig, SeededNoise, edm_sample, karras_sigmas

MU = torch.tensor([[0.3, -0.5, 1.0]])
S = float(torch.tensor(0.4))  # target N(MU, S² I); the float32 value the teacher stores


def gaussian() -> GaussianMixtureDenoiser:
    """D(x, σ) = μ + s²/(s²+σ²)(x − μ)."""
    return GaussianMixtureDenoiser(MU, S)


def test_schedule_eq5():
    n, rho = 18, 7.0
    t = karras_sigmas(gaussian(), SamplerConfig(num_steps=n)).numpy()
    i = np.arange(n)
    expected = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    np.testing.assert_allclose(t[:-1], expected, rtol=1e-12)
    assert t[0] == pytest.approx(80) and t[-2] == pytest.approx(0.002) and t[-1] == 0
    narrow = GaussianMixtureDenoiser(MU, S, sigma_min=0.01, sigma_max=10.0)  # clamped to the teacher's range
    t = karras_sigmas(narrow, SamplerConfig(num_steps=5))
    assert t[0].item() == pytest.approx(10.0) and t[-2].item() == pytest.approx(0.01)


class Rounded(GaussianMixtureDenoiser):
    """A teacher that only supports σ on a grid of powers of 1.5 (like iDDPM's u_j); counts calls."""

    calls = 0

    def round_sigma(self, sigma):
        return 1.5 ** torch.round(torch.log(torch.as_tensor(sigma)) / math.log(1.5))

    def forward(self, x, sigma, labels=None):
        assert torch.allclose(torch.log(sigma) / math.log(1.5), torch.round(torch.log(sigma) / math.log(1.5)))
        Rounded.calls += 1
        return super().forward(x, sigma, labels)


def test_rounding_and_evaluation_count():
    teacher = Rounded(MU, S)
    t = karras_sigmas(teacher, SamplerConfig(num_steps=10))
    k = torch.log(t[:-1]) / math.log(1.5)
    assert torch.allclose(k, k.round())
    edm_sample(teacher, torch.randn(4, 3), cfg=SamplerConfig(num_steps=10, S_churn=5))
    assert Rounded.calls == 2 * 10 - 1


def heun_gain(t: list[float]) -> float:
    """Factor by which Heun's method scales y = x − μ along dy/dσ = a(σ) y, a = σ/(s² + σ²)
    (the PF-ODE of the Gaussian teacher); Euler on the last step to σ = 0."""
    def a(sigma):
        return sigma / (S**2 + sigma**2)

    gain = 1.0
    for i in range(len(t) - 1):
        h = t[i + 1] - t[i]
        euler = 1 + h * a(t[i])
        gain *= euler if t[i + 1] == 0 else 1 + h * (a(t[i]) + a(t[i + 1]) * euler) / 2
    return gain


def test_deterministic_steps_match_scalar_recursion():
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    cfg = SamplerConfig(num_steps=18)
    x = edm_sample(gaussian(), z, cfg=cfg)
    t = karras_sigmas(gaussian(), cfg).tolist()
    expected = MU.double() + heun_gain(t) * (80 * z.double() - MU.double())
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)
    # The exact flow scales x_T − μ by s/√(s² + σ_max²); Heun is 2nd order: error ~6% at 18 steps, /4 at 36.
    exact = S / math.sqrt(S**2 + 80**2)
    errors = [abs(heun_gain(karras_sigmas(gaussian(), SamplerConfig(num_steps=n)).tolist()) / exact - 1)
              for n in (18, 36)]
    assert errors[0] < 0.1 and 3 < errors[0] / errors[1] < 5


@pytest.mark.parametrize("cfg", [SamplerConfig(num_steps=64), SamplerConfig(num_steps=128, S_churn=128)],
                         ids=["deterministic", "churn"])
def test_sample_moments_match_target(cfg):
    n = 20000
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, 3, generator=g)
    def randn_like(t):
        return torch.randn(t.shape, generator=g, dtype=t.dtype)

    x = edm_sample(gaussian(), z, cfg=cfg, randn_like=randn_like)
    mean_se = S / math.sqrt(n)
    var_se = S**2 * math.sqrt(2 / n)
    assert ((x.mean(0) - MU[0].double()).abs() < 5 * mean_se).all(), x.mean(0)
    assert ((x.var(0) - S**2).abs() < 5 * var_se + 0.02 * S**2).all(), x.var(0)  # MC + discretisation


def test_seeded_noise_is_per_sample():
    both = SeededNoise([3, 5])
    alone = SeededNoise([5])
    assert torch.equal(both.randn([2, 4])[1], alone.randn([2, 4])[0])
    assert both.randint(1000)[1] == alone.randint(1000)[0]
    assert not torch.equal(both.randn([8])[0], both.randn([8])[1])


def test_too_few_steps():
    with pytest.raises(ValueError, match="num_steps >= 2"):
        karras_sigmas(gaussian(), SamplerConfig(num_steps=1))
