"""The generator losses and the denoising loss against hand-derived gradients and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from refiner.losses import (
    GENERATOR_LOSSES,
    add_noise,
    denoising_loss,
    dmd_loss,
    edm_weight,
    generator_grad,
    get_loss,
    ikl_loss,
)
from refiner.sigma import KarrasGridSigma, KarrasTimeSigma, LogNormalSigma
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


# ---------------------------------------------------------------------------------------------------------
# generator_grad of every registered loss against hand computations of its formula


class _Linear(torch.nn.Module):
    """D(x_t, σ) = A x_t + b: a denoiser whose input Jacobian A is known (weights trainable, to check that
    the generator loss leaves them without gradients)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())

    def forward(self, x, sigma, labels=None):
        return x @ self.a.T + self.b


def _linear_case(seed: int = 4, n: int = 6, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    teacher = _Linear(torch.eye(d, dtype=torch.float64) * 0.7 + 0.1 * torch.randn(d, d, generator=g,
                                                                                   dtype=torch.float64),
                      torch.randn(d, generator=g, dtype=torch.float64))
    fake = _Linear(torch.eye(d, dtype=torch.float64) * 0.5 + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64),
                   torch.randn(d, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = LogNormalSigma()(n, g).double()
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    x_t = x + sigma[:, None] * noise
    with torch.no_grad():
        d_r, d_f = teacher(x_t, sigma), fake(x_t, sigma)
    w = (x - d_r).abs().mean(1, keepdim=True).clamp_min(1e-5)
    return teacher, fake, x, sigma, noise, d_r, d_f, w


def test_generator_grad_of_ikl_and_dmd_is_the_stopped_denoiser_difference():
    g = torch.Generator().manual_seed(5)
    n, d = 7, 3
    teacher = GaussianMixtureDenoiser(torch.randn(3, d, generator=g), 0.3)
    fake = GaussianMixtureDenoiser(torch.randn(2, d, generator=g), 0.6)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = LogNormalSigma()(n, g).double()
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    x_t = x + sigma[:, None] * noise
    d_r, d_f = teacher(x_t, sigma), fake(x_t, sigma)
    assert torch.allclose(generator_grad("ikl", x, sigma, noise, teacher, fake), (d_f - d_r) / n, atol=1e-12)
    norm = (x - d_r).abs().mean(1, keepdim=True)
    assert torch.allclose(generator_grad("dmd", x, sigma, noise, teacher, fake), (d_f - d_r) / norm / n,
                          atol=1e-12)


def test_generator_grad_of_sid_goes_through_both_networks_inputs():
    # L_n = aᵀ[(D_r − x) − α a] / w,  a = D_r − D_f,  D_r = A x_t + b, D_f = B x_t + c, x_t = x + σε:
    # ∂L_n/∂x = [(A − B)ᵀ((D_r − x) − α a) + (A − I)ᵀ a − α (A − B)ᵀ a] / w   (w = mean|x − D_r| stopped)
    teacher, fake, x, sigma, noise, d_r, d_f, w = _linear_case()
    n, d = x.shape
    a, A, B, eye = d_r - d_f, teacher.a.detach(), fake.a.detach(), torch.eye(d, dtype=torch.float64)
    for alpha in (1.2, 0.5):
        expected = (((d_r - x) - alpha * a) @ (A - B) + a @ (A - eye) - alpha * a @ (A - B)) / w / n
        got = generator_grad("sid", x, sigma, noise, teacher, fake, alpha=alpha)
        assert torch.allclose(got, expected, atol=1e-12), alpha
    # the networks' weights get no gradient and stay trainable
    assert all(p.grad is None and p.requires_grad for m in (teacher, fake) for p in m.parameters())


def test_generator_grad_of_sim_and_uni_goes_through_the_teachers_input_only():
    # sim: ∂L_n/∂x = (A − I)ᵀ u / w,  u = y / √(‖y‖² + c²), y = D_r − D_f, c = huber_c·√dim
    teacher, fake, x, sigma, noise, d_r, d_f, w = _linear_case(6)
    n, d = x.shape
    A, eye, y = teacher.a.detach(), torch.eye(d, dtype=torch.float64), d_r - d_f
    c = 0.3 * math.sqrt(d)
    u = y / (y.square().sum(1, keepdim=True) + c * c).sqrt()
    got = generator_grad("sim", x, sigma, noise, teacher, fake, huber_c=0.3)
    assert torch.allclose(got, u @ (A - eye) / w / n, atol=1e-12)
    # uni: the weight h(r) = f''(r) r² = 1 (rkl), r (fkl), r / (1 + r) (js) over its batch mean, on the L2
    # direction y; log r = 12 counts as 10 (the clamp)
    log_ratio = torch.tensor([-1.0, 0.0, 0.5, 2.0, -0.3, 12.0], dtype=torch.float64)
    r = log_ratio.clamp(max=10.0).exp()[:, None]
    for divergence, h in (("rkl", torch.ones_like(r)), ("fkl", r), ("js", r / (1 + r))):
        got = generator_grad("uni", x, sigma, noise, teacher, fake, divergence=divergence, log_ratio=log_ratio)
        assert torch.allclose(got, h / h.mean() * (y @ (A - eye)) / w / n, atol=1e-12), divergence


def test_uni_reduces_to_its_reverse_kl_member_and_refuses_a_missing_ratio():
    # rkl: the Fisher (SIM-L2) member, whatever ratio is given; fkl and js with a constant ratio (p = q up to a
    # constant: every h(r) equal) give the same gradient, since the weights are self-normalised
    teacher, fake, x, sigma, noise, d_r, d_f, w = _linear_case(11)
    n, d = x.shape
    expected = (d_r - d_f) @ (teacher.a.detach() - torch.eye(d, dtype=torch.float64)) / w / n
    assert torch.allclose(generator_grad("uni", x, sigma, noise, teacher, fake), expected, atol=1e-12)
    varied = torch.linspace(-3, 3, n, dtype=torch.float64)
    assert torch.allclose(generator_grad("uni", x, sigma, noise, teacher, fake, divergence="rkl",
                                         log_ratio=varied), expected, atol=1e-12)
    for divergence in ("fkl", "js"):
        got = generator_grad("uni", x, sigma, noise, teacher, fake, divergence=divergence,
                             log_ratio=torch.full((n,), 0.7, dtype=torch.float64))
        assert torch.allclose(got, expected, atol=1e-12), divergence
        with pytest.raises(ValueError, match=f"--divergence {divergence} weighs samples by the density ratio"):
            generator_grad("uni", x, sigma, noise, teacher, fake, divergence=divergence)


def test_sim_reaches_the_fisher_divergence_and_sid_as_the_huber_constant_grows():
    # The special case SIM names: for c → ∞ the pseudo-Huber distance is ‖y‖²/(2c), the Fisher divergence of
    # SiD. Gaussians of equal variance: p_σ = N(m, (s²+σ²)I), q_σ = N(μ, (s²+σ²)I), q's exact denoiser as the
    # fake. Then y = σ²(m − μ)/(s²+σ²) for every x_t, and c·∂/∂μ of the SIM loss must equal ∂/∂μ of the
    # closed form (1/N) Σ_n ‖y_n(μ)‖²/(2 w_n) (w stopped), and SiD's gradient (∇ₓ(D_r − D_f) = 0 here).
    g = torch.Generator().manual_seed(7)
    n, d, s = 9, 3, 0.4
    m = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    mu = torch.tensor([-0.2, 0.4, 0.0], dtype=torch.float64)
    teacher, fake = GaussianMixtureDenoiser(m[None], s), GaussianMixtureDenoiser(mu[None], s)
    x = mu + s * torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = LogNormalSigma()(n, g).double()
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = 1e7
    grad_sim = generator_grad("sim", x, sigma, noise, teacher, fake, huber_c=c / math.sqrt(d)) * c
    grad_sid = generator_grad("sid", x, sigma, noise, teacher, fake, alpha=1.2)
    w = (x - teacher(x + sigma[:, None] * noise, sigma)).abs().mean(1)
    mu_var = mu.clone().requires_grad_(True)
    y = sigma[:, None] ** 2 * (m - mu_var) / (s**2 + sigma[:, None] ** 2)
    (y.square().sum(1) / (2 * w)).mean().backward()
    assert torch.allclose(grad_sim.sum(0), mu_var.grad, rtol=1e-6)
    assert torch.allclose(grad_sim, grad_sid, rtol=1e-6)


def test_sid_drops_non_finite_samples_and_divides_by_the_whole_batch():
    teacher, fake, x, sigma, noise, d_r, d_f, w = _linear_case(8)
    n, d = x.shape
    bad = sigma > sigma.median()

    class _NaNAbove(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = teacher

        def forward(self, x_t, s, labels=None):
            nan = torch.where(bad, float("nan"), 0.0).to(x_t.dtype)  # NaN rows of their own computation
            return self.inner(x_t, s) + nan[:, None]

    got = generator_grad("sid", x, sigma, noise, _NaNAbove(), fake)
    full = generator_grad("sid", x, sigma, noise, teacher, fake)
    assert bad.any() and torch.isfinite(got).all()
    assert torch.equal(got[bad], torch.zeros_like(got[bad]))
    assert torch.allclose(got[~bad], full[~bad], atol=1e-12)  # each kept row still carries 1/N of the full N


def test_loss_registry_declarations_and_errors():
    assert list(GENERATOR_LOSSES) == ["ikl", "dmd", "sid", "sim", "uni", "dmd2", "sida"]
    sid = get_loss("sid")
    assert sid.input_grad and sid.drop_nonfinite and not sid.needs_data and sid.options == {"alpha": 1.2}
    assert (sid.defaults["sigma"], sid.defaults["t_max"], sid.defaults["fake_sigma"], sid.sigma_init) == \
        ("karras-t", 800.0, "lognormal", 2.5)
    assert not get_loss("ikl").input_grad
    with pytest.raises(ValueError, match="ikl, dmd, sid, sim, uni"):
        get_loss("sidd")
    with pytest.raises(ValueError, match="takes no option alpha"):
        get_loss("ikl").resolve({"alpha": 1.0})
    with pytest.raises(ValueError, match="--divergence"):
        get_loss("uni").resolve({"divergence": "tv"})


def test_sid_time_sigma_follows_the_karras_schedule_up_to_t_max():
    # σ(t) = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, t ~ U[0, t_max/1000] (SiD sid_loss.py)
    g = torch.Generator().manual_seed(9)
    s = KarrasTimeSigma(t_max=800)(50_000, g).double()
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    t = 1 - (s ** (1 / 7) - hi) / (lo - hi)  # invert the schedule
    assert float(s.min()) >= 0.002 * (1 - 1e-5) and float(s.max()) <= (hi + 0.2 * (lo - hi)) ** 7 * (1 + 1e-5)
    assert abs(float(t.mean()) - 0.4) < 0.005 and abs(float(t.std()) - 0.8 / math.sqrt(12)) < 0.005
