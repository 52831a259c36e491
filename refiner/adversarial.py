"""The discriminators of the adversarial losses: a head on the fake-score network's encoder bottleneck, and
the GAN losses of DMD2 and SiDA, as each authors' code has them.

The bottleneck is the output of the encoder's last block (EDM's SongUNet / DhariwalUNet: the `enc` entry
the decoder starts from; the toy's MLP: its last hidden layer). A forward hook reads it from any forward
pass of the fake network, so a pass that also gives D_f gives the logits for free; `encode` stops the pass
after the encoder where only the logits are needed (the decoder is not run).

- DMD2 (Yin et al. 2024, tianweiy/DMD2 main/edm/edm_guidance.py, `cls_pred_branch`): a trained head
  Conv 4x4/2 → GroupNorm(32) → SiLU → Conv 4x4/4 → GroupNorm(32) → SiLU → Conv 1x1 → one logit, made for
  ImageNet-64's 8x8x768 bottleneck. Other bottleneck sizes s keep the layers, with the second kernel and
  stride s/2 so that one logit comes out (s = 8: DMD2's exactly); vectors (the toy) use 1x1 kernels;
  fewer than 256 channels get fewer groups (at least 8 channels each).
  The head is trained with the fake-score network (DMD2's guidance optimiser holds both).
- SiDA (Zhou et al. 2025, mingyuanzhou/SiD branch `sida`, sida_training/sida_networks.py): no parameters:
  the logits are the bottleneck's mean over channels, one per position ([N, 1, h, w]).
- Uni-Instruct's density ratio (`uni --divergence fkl|js`, refiner.losses.uni_loss): SiDA's head and SiDA's
  discriminator loss, used as a ratio estimator only: trained with the logistic loss to tell real images from
  the generator's at the same σ, its logit estimates log p_σ/q_σ (the optimal discriminator is p/(p + q));
  the per-sample log ratio is the mean of the logits over positions of the generator step's own fake pass on
  x_t. It adds no adversarial term to the generator's loss.

Where the loop differs from the authors' code: the generator's labels come from its own prior (uniform
classes), the real images keep theirs (SiDA conditions the generator on the real batch's labels; DMD2 does
as here); DMD2's fake-score σ is drawn from the continuous Karras schedule over its whole range (DMD2: its
1000 grid levels), its AdamW weight decay 0.01 and learning-rate warm-up are not reproduced; SiDA's
per-sample NaN filter in the discriminator loss and its clipping of the fake network's gradients by value
are replaced by the loop's skipping of non-finite steps and --grad-clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from refiner.losses import _mean_abs, _per_sample, edm_weight, frozen, get_loss
from teachers.edm_unets import UNETS
from teachers.mlp import MLPDenoiser
from teachers.sampler import karras_schedule


def bottleneck_module(fake: nn.Module) -> nn.Module:
    """The module whose output is the fake network's deepest encoder feature."""
    if isinstance(fake, MLPDenoiser):
        return fake.net[-2]  # the last hidden layer's activation
    unets = [m for m in fake.modules() if isinstance(m, tuple(UNETS.values()))]
    if len(unets) != 1:
        raise UserError(f"the adversarial losses need a fake-score network with one EDM U-Net ("
                        f"{', '.join(UNETS)}) or the toy's MLP; this one is a {type(fake).__name__}")
    return list(unets[0].enc.values())[-1]


class _Stop(Exception):
    """Raised by the hook to end an encoder-only pass."""


class BottleneckTap:
    """Keeps the latest bottleneck features of `fake` (a forward hook; not part of any state dict)."""

    def __init__(self, fake: nn.Module):
        self.features: torch.Tensor | None = None
        self._stop = False
        self.handle = bottleneck_module(fake).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.features = output
        if self._stop:
            raise _Stop

    def take(self) -> torch.Tensor:
        """The features of the latest pass, released (so they do not hold on to its graph)."""
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("no forward pass of the fake network since the last take()")
        return features

    def encode(self, fake: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None
               ) -> torch.Tensor:
        """The bottleneck of fake(x, σ, labels), running the network only up to it."""
        self._stop = True
        try:
            fake(x, sigma, labels)
        except _Stop:
            pass
        finally:
            self._stop = False
        return self.take()


class DMD2Head(nn.Module):
    """DMD2's classification branch (see the module docstring) for a bottleneck of `channels` x size x size
    (size 1: vectors). Returns one logit per sample, [N, 1], computed in float32 as DMD2 does."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        # DMD2: 32 groups (of 24 channels at 768). Narrower bottlenecks keep groups of >= 8 channels: with one
        # channel per group the second GroupNorm, on a 1x1 map, would output a constant.
        groups = math.gcd(32, max(channels // 8, 1))
        half = max(size // 2, 1)
        first = (nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1) if size >= 2
                 else nn.Conv2d(channels, channels, kernel_size=1))
        self.layers = nn.Sequential(
            first, nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, channels, kernel_size=half, stride=half), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, 1, kernel_size=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        f = f[:, :, None, None] if f.ndim == 2 else f
        return self.layers(f).flatten(1)


class ChannelMeanHead(nn.Module):
    """SiDA's logits: the bottleneck's mean over channels, [N, 1, h, w] (vectors: [N, 1]); no parameters."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.float().mean(dim=1, keepdim=True)


HEADS = ("dmd2", "sida", "uni")
_CHANNEL_MEAN = ("sida", "uni")  # the kinds with SiDA's parameter-free head and discriminator loss


def make_head(kind: str, fake: nn.Module, seed: int) -> nn.Module:
    """The head for `fake`'s bottleneck; its shape is read from one encoder-only pass of one sample (in eval
    mode: no dropout draws), its initial weights (PyTorch's defaults, as DMD2) drawn from `seed`; the global
    random state is left as it was."""
    if kind in _CHANNEL_MEAN:
        return ChannelMeanHead()
    if kind != "dmd2":
        raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")
    tap, training = BottleneckTap(fake), fake.training
    try:
        param = next(fake.parameters())
        labels = torch.zeros(1, fake.label_dim, device=param.device) if getattr(fake, "label_dim", 0) else None
        with torch.no_grad():
            features = tap.encode(fake.eval(), torch.zeros(1, *fake.data_shape, device=param.device),
                                  torch.ones(1, device=param.device), labels)
    finally:
        tap.handle.remove()
        fake.train(training)
    size = features.shape[-1] if features.ndim == 4 else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DMD2Head(features.shape[1], size)
    return head.to(param.device)


# -- GAN losses -------------------------------------------------------------------------------------------

def dmd2_generator_gan(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss E softplus(−ℓ(G(z))) (DMD2 `compute_generator_clean_cls_loss`)."""
    return F.softplus(-logits_fake).mean()


def dmd2_discriminator_gan(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """E softplus(ℓ(fake)) + E softplus(−ℓ(real)) (DMD2 `compute_guidance_clean_cls_loss`; ℓ = logit of
    "real")."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def sida_generator_gan(logits_fake: torch.Tensor, weight_factor: torch.Tensor) -> torch.Tensor:
    """SiDA's generator term (sida_loss.py `generator_share_encoder_loss` and its training loop):
    BCE(clamp(ℓ, −10, 10), 1) averaged over every logit of the batch, divided per sample by SiD's
    normaliser w_i = mean_CHW |x_i − D_r,i| and averaged over the batch:
        L = mean_{n,h,w} softplus(−clamp(ℓ, −10, 10)) · mean_i 1/w_i.
    (The training loop multiplies this by C·H·W; the caller does.)"""
    bce = F.softplus(-logits_fake.clamp(-10, 10)).mean()
    return bce * (1 / weight_factor.reshape(-1)).mean()


def sida_discriminator_gan(logits_real: torch.Tensor, logits_fake: torch.Tensor, weight: torch.Tensor
                           ) -> torch.Tensor:
    """SiDA's discriminator loss (sida_loss.py `fakescore_discriminator_share_encoder_loss`): the BCE of
    real and fake logits, each averaged over the batch, weighted per sample by the denoising weight λ(σ_i)
    of the shared noise level and averaged:  L = mean_i λ(σ_i) · (BCE(ℓ_real, 1) + BCE(ℓ_fake, 0)) / 2."""
    bce = (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()) / 2
    return weight.reshape(-1).mean() * bce


# -- the discriminator inside the loop ------------------------------------------------------------------

@dataclass(frozen=True)
class GanOptions:
    """`kind` 'dmd2', 'sida' or 'uni' (the density ratio of uni --divergence fkl|js: SiDA's discriminator,
    no generator term); the options of loss `kind` (refiner.losses registry, CLI names with '-'), weights in
    the authors' units (see `Adversary`):

    gen_weight (--gan-weight): DMD2 --gen_cls_loss_weight (ImageNet script 3e-3); SiDA --lsg_gan / --lsg
        (run_sida.sh: 0.01 / 100 = 1e-4; the loop's loss scale 100 is SiDA's --lsg).
    disc_weight (--disc-weight): DMD2 --cls_loss_weight (ImageNet script 1e-2); SiDA --lsd (1).
    noise_levels (--gan-levels): DMD2 --diffusion_gan_max_timestep: the head sees x + σε with σ uniform over
        the lowest `noise_levels` of the 1000 Karras levels (ImageNet script: 1000, all); 0 = clean images at
        σ_min. SiDA's head sees the noise of the pass it shares.
    start_kimg (--gan-start-kimg): SiDA: the adversarial term joins after this many thousand generator
        images, from then on mixed 0.5·SiD + 0.5·GAN (sida_training_loop.py: after 200 kimg, of which the
        first 100 update only the fake network: the loop's --fake-warmup, set by SiDA's presets). DMD2: 0."""

    kind: str
    gen_weight: float
    disc_weight: float
    noise_levels: int = 1000
    start_kimg: float = 0.0


KARRAS_LEVELS = 1000  # DMD2 --num_train_timesteps


class Adversary(nn.Module):
    """The discriminator of an adversarial loss on `fake`'s bottleneck: its head (the only state, trained
    with the fake network by the loop's fake optimiser and saved in its checkpoints) and the hook.

    Units: our score losses sum over a sample's C·H·W elements where DMD2's average, so DMD2's terms are
    multiplied by C·H·W to keep their weight relative to the score losses; SiDA's generator term carries
    that factor in its own code, its discriminator term not."""

    def __init__(self, options: GanOptions, fake: nn.Module, seed: int):
        super().__init__()
        self.options = options
        self.head = make_head(options.kind, fake, seed)
        self.tap = BottleneckTap(fake)
        grid = karras_schedule(KARRAS_LEVELS).flip(0).to(torch.float32)  # ascending, DMD2's karras_sigmas
        self.register_buffer("grid", grid[:max(options.noise_levels, 1)], persistent=False)
        self.ratio_stats: dict[str, float] = {}

    def draws(self, n: int, data_shape: tuple[int, ...], generator: torch.Generator, count: int
              ) -> list[torch.Tensor]:
        """Global random draws of DMD2's head passes: `count` pairs (level index, ε); SiDA needs none."""
        if self.options.kind != "dmd2":
            return []
        out = []
        for _ in range(count):
            out.append(torch.randint(0, max(self.options.noise_levels, 1), (n,), generator=generator))
            out.append(torch.randn((n, *data_shape), generator=generator))
        return out

    def _noisy_logits(self, fake: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, index: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """DMD2 `compute_cls_logits`: x + σε at σ = grid[index] (clean at σ_min without diffusion GAN)."""
        sigma = self.grid.to(x.device)[index.to(x.device)]
        if self.options.noise_levels:
            x = x + _per_sample(sigma, x) * noise
        return self.head(self.tap.encode(fake, x, sigma, labels))

    def discriminator_loss(self, fake: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                           real: torch.Tensor, real_labels: torch.Tensor | None, sigma: torch.Tensor,
                           noise: torch.Tensor, draws: list[torch.Tensor], sigma_data: float
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """The discriminator's loss, to add to the fake network's denoising loss. SiDA: call right after the
        fake step's pass on x + σε (its bottleneck gives the fake logits); the real images get the same σ
        and ε. DMD2: fresh noise levels for both (`draws` from `draws(count=2)`)."""
        numel = x[0].numel()
        if self.options.kind in _CHANNEL_MEAN:
            logits_fake = self.head(self.tap.take())
            logits_real = self.head(self.tap.encode(fake, real + _per_sample(sigma, real) * noise, sigma,
                                                    real_labels))
            loss = sida_discriminator_gan(logits_real, logits_fake, edm_weight(sigma, sigma_data))
        else:
            logits_real = self._noisy_logits(fake, real, real_labels, draws[0], draws[1])
            logits_fake = self._noisy_logits(fake, x, labels, draws[2], draws[3])
            loss = numel * dmd2_discriminator_gan(logits_real, logits_fake)
        stats = {"loss_disc": float(loss.detach()), "d_real": float(torch.sigmoid(logits_real.detach()).mean()),
                 "d_fake": float(torch.sigmoid(logits_fake.detach()).mean())}
        return self.options.disc_weight * loss, stats

    def log_ratio(self) -> torch.Tensor:
        """Per-sample log p_σ/q_σ from the latest pass of the fake network: the logits' mean over positions."""
        log_ratio = self.head(self.tap.take()).detach().flatten(1).mean(1)
        self.ratio_stats = {"log_ratio": float(log_ratio.mean()), "log_ratio_std": float(log_ratio.std())
                            if log_ratio.numel() > 1 else 0.0}
        return log_ratio

    def generator_loss(self, fake: nn.Module, score_loss: torch.Tensor, x: torch.Tensor,
                       labels: torch.Tensor | None, draws: list[torch.Tensor], d_real: torch.Tensor,
                       kimg: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator's total loss from its score loss. DMD2: score + w·C·H·W·softplus(−ℓ(x + σε)) with a
        fresh σ (`draws(count=1)`). SiDA: the logits of the score loss's own pass on x_t (with gradient to x),
        normalised by SiD's sg[mean|x − D_r|]; before `start_kimg` the score loss alone, then
        0.5·score + 0.5·w·C·H·W·GAN. Uni: the score loss unchanged (its pass's logits were read by
        `log_ratio`)."""
        numel = x[0].numel()
        if self.options.kind == "uni":
            return score_loss, self.ratio_stats
        if self.options.kind == "sida":
            logits = self.head(self.tap.take())
            if kimg < self.options.start_kimg:
                return score_loss, {}
            gan = numel * sida_generator_gan(logits, _mean_abs(x - d_real))
            total = 0.5 * score_loss + 0.5 * self.options.gen_weight * gan
        else:
            with frozen(fake, self.head):
                gan = numel * dmd2_generator_gan(self._noisy_logits(fake, x, labels, draws[0], draws[1]))
            total = score_loss + self.options.gen_weight * gan
        return total, {"loss_gan": float(gan.detach())}


def gan_options(loss: str, options: dict[str, Any]) -> GanOptions | None:
    """The discriminator of loss `loss` with its resolved options (None for a loss without one)."""
    spec = get_loss(loss)
    if not spec.uses_discriminator(options):
        return None
    o = spec.resolve(options)
    if loss == "uni":  # a ratio estimator: SiDA's discriminator loss at weight 1 (SiDA --lsd), no generator term
        return GanOptions(loss, 0.0, 1.0, noise_levels=0)
    return GanOptions(loss, o["gan_weight"], o["disc_weight"], noise_levels=o.get("gan_levels", 0),
                      start_kimg=o.get("gan_start_kimg", 0.0))
