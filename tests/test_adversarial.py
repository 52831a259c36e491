"""The discriminators of the adversarial losses (DMD2's head, SiDA's channel mean) on the fake network's
bottleneck, and their GAN losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import small_edm_kwargs
from torch import nn

from refiner.adversarial import (
    BottleneckTap,
    DMD2Head,
    dmd2_discriminator_gan,
    dmd2_generator_gan,
    make_head,
    sida_discriminator_gan,
    sida_generator_gan,
)
from refiner.jobs import trainable_copy
from refiner.losses import frozen
from teachers.edm_loader import EDMTeacher
from teachers.edm_precond import EDMPrecond
from teachers.mlp import MLPDenoiser

SONG = small_edm_kwargs(16, label_dim=3)
DHARIWAL = dict(img_resolution=16, img_channels=3, label_dim=3, model_type="DhariwalUNet", model_channels=32,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def _fake(kwargs: dict) -> nn.Module:
    """A fake network whose zero-initialised layers (ADM's residual branches) have non-zero weights."""
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return trainable_copy(EDMTeacher(net))


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


@pytest.mark.parametrize("kwargs, channels", [(SONG, 32), (DHARIWAL, 64)], ids=["SongUNet", "DhariwalUNet"])
def test_dmd2_head_on_the_bottleneck_gives_one_logit_and_gradients(kwargs, channels):
    fake = _fake(kwargs)
    head = make_head("dmd2", fake, seed=0)
    tap = BottleneckTap(fake)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    labels = torch.eye(3)[[0, 2]]
    features = tap.encode(fake, x, torch.tensor([0.5, 2.0]), labels)
    assert features.shape == (2, channels, 8, 8)  # the encoder's last block, at 16 / 2
    logits = head(features)
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0  # through the fake network's encoder into its input
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    enc_grads = [p.grad for p in fake.network.model.enc.parameters() if p.grad is not None]
    dec_grads = [p.grad for p in fake.network.model.dec.parameters() if p.grad is not None]
    assert enc_grads and not dec_grads
    # the labels condition the features
    other = tap.encode(fake, x.detach(), torch.tensor([0.5, 2.0]), torch.eye(3)[[1, 1]])
    assert not torch.equal(other, features.detach())


def test_encoder_only_pass_equals_the_full_pass_and_skips_the_decoder():
    fake = _fake(SONG)
    tap = BottleneckTap(fake)
    calls = []
    for block in fake.network.model.dec.values():
        block.register_forward_hook(lambda *a: calls.append(1))
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        fake(x, sigma, torch.eye(3))
        full = tap.take()
        n_full = len(calls)
        encoded = tap.encode(fake, x, sigma, torch.eye(3))
    assert n_full > 0 and len(calls) == n_full
    assert torch.equal(encoded, full)
    with pytest.raises(RuntimeError, match="no forward pass"):
        tap.take()


def test_dmd2_head_layers_at_imagenet_size_are_dmd2s():
    head = DMD2Head(768, 8)
    convs = [m for m in head.layers if isinstance(m, nn.Conv2d)]
    norms = [m for m in head.layers if isinstance(m, nn.GroupNorm)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (768, 768, (4, 4), (2, 2), (1, 1)), (768, 768, (4, 4), (4, 4), (0, 0)), (768, 1, (1, 1), (1, 1), (0, 0))]
    assert [n.num_groups for n in norms] == [32, 32]
    assert head(torch.randn(2, 768, 8, 8)).shape == (2, 1)


def test_head_initialisation_comes_from_the_seed_and_leaves_the_global_rng_alone():
    fake = MLPDenoiser(dim=2)
    state = torch.get_rng_state()
    a, b, c = (make_head("dmd2", fake, seed=s) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)
    features = torch.randn(5, 128)
    assert a(features).shape == (5, 1)  # the toy's 128 hidden features act as a 1x1 map


def test_sida_logits_are_the_channel_mean_without_parameters():
    head = make_head("sida", MLPDenoiser(dim=2), seed=0)
    assert list(head.parameters()) == []
    features = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(head(features), features.mean(1, keepdim=True))


def test_frozen_keeps_weights_out_of_the_graph_but_not_the_input():
    fake = _fake(SONG)
    head = make_head("dmd2", fake, seed=0)
    tap = BottleneckTap(fake)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with frozen(fake, head):
        head(tap.encode(fake, x, torch.ones(2), torch.eye(3)[:2])).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in [*fake.parameters(), *head.parameters()])


def test_dmd2_gan_losses_by_hand():
    fake_logits = torch.tensor([[0.5], [-1.0], [3.0]])
    real_logits = torch.tensor([[2.0], [-0.25], [0.0]])
    generator = sum(_softplus(-v) for v in (0.5, -1.0, 3.0)) / 3
    assert dmd2_generator_gan(fake_logits).item() == pytest.approx(generator, rel=1e-6)
    disc = sum(_softplus(v) for v in (0.5, -1.0, 3.0)) / 3 + sum(_softplus(-v) for v in (2.0, -0.25, 0.0)) / 3
    assert dmd2_discriminator_gan(real_logits, fake_logits).item() == pytest.approx(disc, rel=1e-6)


def test_sida_gan_losses_by_hand():
    # logits [N=2, 1, 1, 2]: SiDA's per-position logits; 12 and -15 are clamped to ±10 by the generator loss
    logits = torch.tensor([[[[0.5, 12.0]]], [[[-15.0, -1.0]]]], requires_grad=True)
    weight_factor = torch.tensor([0.5, 0.25])
    bce = (_softplus(-0.5) + _softplus(-10.0) + _softplus(10.0) + _softplus(1.0)) / 4
    loss = sida_generator_gan(logits, weight_factor)
    assert loss.item() == pytest.approx(bce * (2 + 4) / 2, rel=1e-6)
    # the same with PyTorch's BCE, as SiDA writes it: BCEWithLogits(clamp(ℓ), 1) / w_i, then the batch mean
    reference = (nn.BCEWithLogitsLoss()(logits.detach().clamp(-10, 10), torch.ones(2, 1, 1, 2))
                 / weight_factor.reshape(-1, 1, 1, 1)).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 0, 0, 1] == 0 and logits.grad[1, 0, 0, 0] == 0 and logits.grad[0, 0, 0, 0] < 0

    real = torch.tensor([[[[1.0, -2.0]]], [[[0.0, 4.0]]]])
    fake = torch.tensor([[[[0.3, 0.0]]], [[[-0.7, 2.0]]]])
    weight = torch.tensor([3.0, 5.0])  # λ(σ_i)
    bce_real = (_softplus(-1.0) + _softplus(2.0) + _softplus(0.0) + _softplus(-4.0)) / 4
    bce_fake = (_softplus(0.3) + _softplus(0.0) + _softplus(-0.7) + _softplus(2.0)) / 4
    expected = 4.0 * (bce_real + bce_fake) / 2
    assert sida_discriminator_gan(real, fake, weight).item() == pytest.approx(expected, rel=1e-6)


def _adversary(kind: str, **options) -> tuple:
    from refiner.adversarial import Adversary, gan_options

    fake = MLPDenoiser(dim=2)
    return Adversary(gan_options(kind, options), fake, seed=0), fake


def test_sida_discriminator_sees_real_images_at_the_fake_passs_noise():
    adversary, fake = _adversary("sida", disc_weight=0.5)
    g = torch.Generator().manual_seed(0)
    x, real = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    sigma, noise = torch.tensor([0.1, 0.5, 1.0, 3.0]), torch.randn(4, 2, generator=g)
    fake(x + sigma[:, None] * noise, sigma)  # the fake step's denoising pass
    loss, stats = adversary.discriminator_loss(fake, x, None, real, None, sigma, noise, [], sigma_data=0.5)
    # by hand: channel means of the last hidden layer on both noisy batches, BCE weighted by mean λ(σ)
    hidden = lambda v: fake.net[:-1](torch.cat([v / (sigma[:, None] ** 2 + 0.25).sqrt(),  # noqa: E731
                                                _noise_embedding(fake, sigma)], 1)).mean(1, keepdim=True)
    lam = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).mean()
    bce = (torch.nn.functional.softplus(-hidden(real + sigma[:, None] * noise)).mean()
           + torch.nn.functional.softplus(hidden(x + sigma[:, None] * noise)).mean()) / 2
    assert loss.item() == pytest.approx(0.5 * (lam * bce).item(), rel=1e-5)
    assert stats["loss_disc"] == pytest.approx((lam * bce).item(), rel=1e-5)


def _noise_embedding(fake: MLPDenoiser, sigma: torch.Tensor) -> torch.Tensor:
    angles = (sigma[:, None].log() / 4) * fake.freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def test_sida_generator_mix_starts_after_gan_start_kimg():
    adversary, fake = _adversary("sida", gan_weight=0.1, gan_start_kimg=2.0)
    x = torch.randn(3, 2, requires_grad=True)
    d_real = x.detach() + torch.tensor([[0.5, -0.5], [1.0, 1.0], [0.2, 0.0]])  # mean|x − D_r| = 0.5, 1, 0.1
    score = (x**2).sum()
    fake(x, torch.full((3,), 0.3))  # the score loss's pass on x_t (here x_t = x)
    before, stats = adversary.generator_loss(fake, score, x, None, [], d_real, kimg=1.9)
    assert before is score and stats == {}
    fake(x, torch.full((3,), 0.3))  # the score loss's pass on x_t (here x_t = x)
    after, stats = adversary.generator_loss(fake, score, x, None, [], d_real, kimg=2.0)
    logits = fake.net[:-1](torch.cat([x.detach() / (0.09 + 0.25) ** 0.5,
                                      _noise_embedding(fake, torch.full((3,), 0.3))], 1)).mean(1)
    gan = 2 * torch.nn.functional.softplus(-logits.clamp(-10, 10)).mean() * (1 / 0.5 + 1 + 1 / 0.1) / 3  # C·H·W = 2
    assert after.item() == pytest.approx(0.5 * score.item() + 0.5 * 0.1 * gan.item(), rel=1e-5)
    assert stats["loss_gan"] == pytest.approx(gan.item(), rel=1e-5)


def test_dmd2_terms_are_scaled_by_the_elements_per_sample():
    adversary, fake = _adversary("dmd2", gan_weight=0.5, disc_weight=0.25, gan_levels=0)  # clean, at σ_min
    x, real = torch.randn(3, 2), torch.randn(3, 2)
    draws = [torch.zeros(3, dtype=torch.long), torch.zeros(3, 2)] * 2
    loss, _ = adversary.discriminator_loss(fake, x, None, real, None, torch.ones(3), torch.zeros(3, 2), draws, 0.5)
    tap = BottleneckTap(fake)
    sigma_min = torch.full((3,), 0.002)
    lr, lf = (adversary.head(tap.encode(fake, v, sigma_min, None)) for v in (real, x))
    assert loss.item() == pytest.approx(0.25 * 2 * dmd2_discriminator_gan(lr, lf).item(), rel=1e-5)
    score = torch.tensor(1.5)
    total, _ = adversary.generator_loss(fake, score, x, None, draws[:2], x, kimg=0.0)
    assert total.item() == pytest.approx(1.5 + 0.5 * 2 * dmd2_generator_gan(lf).item(), rel=1e-5)


def test_uni_generator_grad_with_a_fixed_ratio_head_equals_a_hand_computation():
    # uni --divergence fkl|js: log r per sample = the channel mean of the fake MLP's last hidden layer on the
    # generator step's own pass at x_t (a fixed, untrained head); teacher D_r = A x_t + b (exact Jacobian).
    # ∂L_n/∂x = h_n/h̄ · (A − I)ᵀ (D_r − D_f) / (N · mean|x − D_r|),  h = r (fkl) or r/(1 + r) (js).
    from refiner.losses import generator_objective

    g = torch.Generator().manual_seed(3)
    n, d = 6, 2
    a, b = torch.eye(d) * 0.8 + 0.1 * torch.randn(d, d, generator=g), torch.randn(d, generator=g)
    teacher = lambda v, s, labels=None: v @ a.T + b  # noqa: E731
    x, noise = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 4.0])
    x_t = x + sigma[:, None] * noise
    for divergence in ("fkl", "js"):
        adversary, fake = _adversary("uni", divergence=divergence)
        with torch.no_grad():
            log_r = fake.net[:-1](torch.cat([x_t / (sigma[:, None] ** 2 + 0.25).sqrt(),
                                             _noise_embedding(fake, sigma)], 1)).mean(1)
            d_r, d_f = teacher(x_t, sigma), fake(x_t, sigma)
        h = log_r.exp() if divergence == "fkl" else torch.sigmoid(log_r)
        w = (x - d_r).abs().mean(1, keepdim=True)
        expected = (h / h.mean())[:, None] * ((d_r - d_f) @ (a - torch.eye(d))) / w / n
        xg = x.clone().requires_grad_(True)
        loss = generator_objective("uni", xg, sigma, noise, teacher, fake, divergence=divergence,
                                   discriminator=adversary.log_ratio)
        torch.testing.assert_close(torch.autograd.grad(loss, xg)[0], expected, rtol=1e-5, atol=1e-7)
        assert adversary.ratio_stats["log_ratio"] == pytest.approx(log_r.mean().item(), rel=1e-5)
        # the generator's total loss is the score loss: no adversarial term
        total, stats = adversary.generator_loss(fake, loss, xg, None, [], d_r, kimg=0.0)
        assert total is loss and "log_ratio" in stats
    assert list(adversary.head.parameters()) == [] and adversary.options.gen_weight == 0


def test_uni_needs_a_discriminator_only_for_fkl_and_js():
    from refiner.adversarial import gan_options
    from refiner.losses import get_loss

    uni = get_loss("uni")
    assert gan_options("uni", {}) is None and not uni.uses_data({"divergence": "rkl"})
    for divergence in ("fkl", "js"):
        assert uni.uses_data({"divergence": divergence}) and uni.uses_discriminator({"divergence": divergence})
        options = gan_options("uni", {"divergence": divergence})
        assert (options.kind, options.gen_weight, options.disc_weight) == ("uni", 0.0, 1.0)
