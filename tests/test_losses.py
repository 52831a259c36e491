"""The IKL surrogate and the denoising loss against hand-derived gradients and closed forms."""

from __future__ import annotations

import math

import torch

from refiner.losses import add_noise, denoising_loss, dmd_loss, edm_weight, ikl_loss
from refiner.sigma import KarrasGridSigma, LogNormalSigma
from teachers.analytic import GaussianMixtureDenoiser
from teachers.sampler import karras_schedule


def test_ikl_gradient_equals_hand_derivation_for_a_linear_generator():
    # x = W z + b. Theorem 3.1 (w = σ² in score space):
    # ∇_W = (1/N) Σ_n (D_f − D_r)_n z_nᵀ,  ∇_b = (1/N) Σ_n (D_f − D_r)_n.
    g = torch.Generator().manual_seed(0)
    n, k, d = 16, 3, 4
    W = torch.randn(d, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    sigma = LogNormalSigma()(n, g).double()
    teacher = GaussianMixtureDenoiser(torch.randn(3, d, generator=g), 0.3)
    fake = GaussianMixtureDenoiser(torch.randn(2, d, generator=g), 0.7)
    x = z @ W.T + b
    x_t = add_noise(x.detach(), sigma, torch.randn(n, d, generator=g, dtype=torch.float64))
    d_real, d_fake = teacher(x_t, sigma), fake(x_t, sigma)
    ikl_loss(x, d_real, d_fake, sigma).backward()
    diff = d_fake - d_real
    assert torch.allclose(W.grad, diff.T @ z / n, atol=1e-12)
    assert torch.allclose(b.grad, diff.mean(0), atol=1e-12)
    # and in score space: D_f − D_r = σ² (s_f − s_r)
    s = sigma[:, None] ** 2
    s_f, s_r = (d_fake - x_t) / s, (d_real - x_t) / s
    assert torch.allclose(diff, s * (s_f - s_r), atol=1e-10)


def test_dmd_gradient_is_ikl_divided_by_mean_abs_residual():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    d_real, d_fake = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    dmd_loss(x, d_real, d_fake, torch.ones(5)).backward()
    norm = (x.detach() - d_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, (d_fake - d_real) / norm / 5, atol=1e-12)


def test_denoising_loss_is_edm_weighted_squared_error():
    g = torch.Generator().manual_seed(2)
    x0, den = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=torch.float64)
    expected = sum((s**2 + 0.25) / (s * 0.5) ** 2 * ((den[i] - x0[i]) ** 2).sum() for i, s in enumerate(sigma)) / 4
    assert torch.allclose(denoising_loss(den, x0, sigma, 0.5), expected)
    assert torch.allclose(edm_weight(torch.tensor(0.5), 0.5), torch.tensor(8.0))


def test_ikl_descent_with_exact_fake_score_moves_a_gaussian_onto_the_teacher():
    # Generator x = μ + s·z. Its diffused law is N(μ, (s² + σ²) I), whose exact denoiser is the one-component
    # mixture at the current (μ, s): this replaces the learned fake network. The teacher is N(m*, s*² I).
    torch.manual_seed(0)
    target_mean, target_std = torch.tensor([1.0, -2.0]), 0.5
    teacher = GaussianMixtureDenoiser(target_mean[None], target_std)
    mu = torch.zeros(2, requires_grad=True)
    log_s = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([mu, log_s], lr=0.05, betas=(0.0, 0.999))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    g = torch.Generator().manual_seed(0)
    sigmas = LogNormalSigma()
    for _ in range(500):
        z = torch.randn(2048, 2, generator=g)
        x = mu + log_s.exp() * z
        sigma = sigmas(2048, g)
        x_t = add_noise(x.detach(), sigma, torch.randn(2048, 2, generator=g))
        fake = GaussianMixtureDenoiser(mu.detach()[None], log_s.detach().exp())
        with torch.no_grad():
            d_real, d_fake = teacher(x_t, sigma), fake(x_t, sigma)
        opt.zero_grad()
        ikl_loss(x, d_real, d_fake, sigma).backward()
        opt.step()
        sched.step()
    assert torch.allclose(mu.detach(), target_mean, rtol=0.02, atol=0.0), mu
    assert math.isclose(float(log_s.detach().exp()), target_std, rel_tol=0.02), float(log_s.detach().exp())


def test_sigma_samplers():
    g = torch.Generator().manual_seed(3)
    s = LogNormalSigma()(200_000, g)
    assert abs(float(s.log().mean()) + 1.2) < 0.01 and abs(float(s.log().std()) - 1.2) < 0.01
    grid = karras_schedule(18)
    assert math.isclose(float(grid[0]), 80.0) and math.isclose(float(grid[-1]), 0.002, rel_tol=1e-9)
    # eq. 5 at i = N/2 by hand
    rho = 7.0
    mid = (80 ** (1 / rho) + 9 / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert math.isclose(float(grid[9]), mid, rel_tol=1e-12)
    draws = KarrasGridSigma(levels=1000, min_percent=0.02, max_percent=0.98)(10_000, g)
    full = karras_schedule(1000).float()
    assert set(draws.tolist()) <= set(full[19:980].tolist())
