"""The exact Gaussian-mixture denoiser against Monte Carlo and closed forms."""

from __future__ import annotations

import torch

from teachers.analytic import GaussianMixtureDenoiser, grid, ring
from teachers.base import Denoiser, score


def test_matches_monte_carlo_posterior_mean_1d():
    # E[x0 | x_t = x] ≈ Σ_i x0_i N(x; x0_i, σ²) / Σ_i N(x; x0_i, σ²), x0_i drawn from the mixture.
    teacher = GaussianMixtureDenoiser(torch.tensor([[-1.0], [0.5], [2.0]]), torch.tensor([0.2, 0.4, 0.1]),
                                      torch.tensor([0.5, 0.3, 0.2]))
    g = torch.Generator().manual_seed(0)
    x0 = teacher.sample(400_000, g).double()[:, 0]
    x = torch.tensor([-1.5, -0.2, 0.7, 1.6, 2.2], dtype=torch.float64)
    for sigma in (0.05, 0.3, 1.0, 4.0):
        logw = -0.5 * ((x[:, None] - x0[None]) / sigma) ** 2
        w = torch.softmax(logw, dim=1)
        mc = (w * x0[None]).sum(1)
        exact = teacher(x[:, None], torch.full((5,), sigma, dtype=torch.float64))[:, 0]
        assert torch.allclose(exact, mc, atol=0.02), (sigma, exact, mc)


def test_single_gaussian_closed_form_and_score():
    mu, s = torch.tensor([[0.3, -0.7, 1.1]]), 0.6
    teacher = GaussianMixtureDenoiser(mu, s)
    x = torch.randn(8, 3, dtype=torch.float64)
    sigma = torch.linspace(0.01, 5, 8, dtype=torch.float64)[:, None]
    expected = mu.double() + s**2 / (s**2 + sigma**2) * (x - mu.double())
    assert torch.allclose(teacher(x, sigma[:, 0]), expected, atol=1e-12)
    # score of N(μ, (s² + σ²) I) is −(x − μ)/(s² + σ²)
    assert torch.allclose(score(teacher, x, sigma[:, 0]), -(x - mu.double()) / (s**2 + sigma**2), atol=1e-10)


def test_stable_far_from_every_mode_and_interface():
    teacher = ring()
    x = torch.tensor([[1e4, -1e4], [0.0, 0.0]])
    out = teacher(x, torch.tensor([1e-3, 1e-3]))
    assert torch.isfinite(out).all()
    assert isinstance(teacher, Denoiser) and teacher.data_shape == (2,)
    assert grid().means.shape == (25, 2)
    # σ → ∞: the denoiser returns the mixture mean (0 for the ring)
    assert torch.allclose(teacher(torch.randn(4, 2), torch.full((4,), 1e6)), torch.zeros(4, 2), atol=1e-4)


def test_sampler_moments():
    teacher = GaussianMixtureDenoiser(torch.tensor([[0.0, 0.0], [3.0, 3.0]]), 0.5, torch.tensor([0.25, 0.75]))
    x = teacher.sample(200_000, torch.Generator().manual_seed(1)).double()
    assert torch.allclose(x.mean(0), torch.tensor([2.25, 2.25], dtype=torch.float64), atol=0.01)
    # per-coordinate variance: s² + p(1−p)·Δ² = 0.25 + 0.1875·9
    assert torch.allclose(x.var(0), torch.full((2,), 0.25 + 0.1875 * 9, dtype=torch.float64), rtol=0.01)
