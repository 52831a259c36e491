"""Building the demo's assets from Fashion-MNIST with our own code: a small EDM teacher (DDPM++ SongUNet,
EDM loss and preconditioning), a small StyleGAN2 generator trained as a GAN (non-saturating loss + R1,
stopped early on purpose) and a small domain classifier (metrics/classifier.py).

Every trainer is time-boxed (`seconds`) and step-capped (`max_steps`), draws all its randomness from
generators seeded by its config, and reports what it did (steps, images, seconds) for the manifest.
`scripts/build_demo_assets.py` drives the whole build; refiner.demo.assets loads the result.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from gan_adapters.stylegan2 import (
    Conv2dLayer,
    FullyConnectedLayer,
    GeneratorConfig,
    MappingConfig,
    StyleGAN2Network,
    SynthesisConfig,
)
from metrics.classifier import ClassifierConfig, DomainClassifier
from metrics.images import quantize
from refiner.ema import ema_beta, update_ema
from refiner.losses import denoising_loss
from refiner.sigma import LogNormalSigma
from teachers.edm_precond import EDMPrecond

# The demo's networks. DDPM++ (SongUNet, positional embedding, standard encoder/decoder, filter [1, 1])
# at a small width: 16-32-32 channels at 32-16-8 px, one block per level, attention only in the decoder's
# first (8 px) block, as in every DDPM++.
TEACHER_KWARGS: dict[str, Any] = dict(
    img_resolution=32, img_channels=1, label_dim=0, use_fp16=False, sigma_data=0.5, model_type="SongUNet",
    model_channels=16, channel_mult=[1, 2, 2], channel_mult_emb=4, num_blocks=1, attn_resolutions=[],
    dropout=0.0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
    decoder_type="standard", resample_filter=[1, 1])

# StyleGAN2 at 32 px, one channel: 64 channels at 4-16 px, 32 at 32 px, a 2-layer mapping, no noise
# inputs (a z gives one image, so grids of the same seeds compare exactly).
GAN_CONFIG = GeneratorConfig(
    z_dim=64, c_dim=0, w_dim=64, img_resolution=32, img_channels=1,
    mapping=MappingConfig(num_layers=2),
    synthesis=SynthesisConfig(channel_base=1024, channel_max=64, use_noise=False))


def build_teacher(kwargs: dict[str, Any] = TEACHER_KWARGS) -> EDMPrecond:
    return EDMPrecond(**kwargs)


def build_generator(config: GeneratorConfig = GAN_CONFIG) -> StyleGAN2Network:
    return StyleGAN2Network(copy.deepcopy(config))


@dataclass
class Budget:
    """Stop after `seconds` of wall time or `max_steps` steps, whichever comes first."""

    seconds: float
    max_steps: int = 1 << 40

    def loop(self) -> Callable[[int], bool]:
        start = time.perf_counter()
        return lambda step: step < self.max_steps and time.perf_counter() - start < self.seconds


def random_batch(images: torch.Tensor, batch: int, rng: torch.Generator) -> torch.Tensor:
    """`batch` images drawn with replacement (indices from `rng`). No mirroring: Fashion-MNIST's shoes
    all point one way, and mirrored ones would move the teacher away from the data."""
    idx = torch.randint(len(images), (batch,), generator=rng, device=rng.device)
    return images[idx.to(images.device)]


def _report(steps: int, batch: int, start: float, **extra: Any) -> dict[str, Any]:
    return {"steps": steps, "kimg": steps * batch / 1000, "seconds": round(time.perf_counter() - start, 1),
            **extra}


# ---------------------------------------------------------------------------------------------------
# Teacher: EDM training (Karras et al. 2022, Alg. / eq. 2): ln σ ~ N(P_mean, P_std²),
# L = λ(σ) ‖D(x + σn; σ) − x‖², λ(σ) = (σ² + σ_d²)/(σ σ_d)²; Adam, linear lr warm-up, EMA of the weights.

@dataclass
class TeacherTraining:
    batch: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_halflife_kimg: float = 100.0
    ema_rampup: float = 0.05
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 1


def train_teacher(net: EDMPrecond, images: torch.Tensor, cfg: TeacherTraining, budget: Budget,
                  echo: Callable[[str], None] = print) -> tuple[EDMPrecond, dict[str, Any]]:
    """Returns (the EMA network in eval mode, a report). `images`: float [N, C, H, W] in [-1, 1]."""
    device = images.device
    rng = torch.Generator(device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    sigma_sampler = LogNormalSigma(cfg.p_mean, cfg.p_std)
    step, start, loss_sum = 0, time.perf_counter(), 0.0
    keep_going = budget.loop()
    while keep_going(step):
        x = random_batch(images, cfg.batch, rng)
        sigma = sigma_sampler(cfg.batch, rng, device=device)
        noise = torch.randn(x.shape, generator=rng, device=device)
        loss = denoising_loss(net(x + sigma[:, None, None, None] * noise, sigma), x, sigma, net.sigma_data)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        update_ema(ema, net, ema_beta(cfg.batch, step * cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup))
        loss_sum += float(loss.detach())
        if step % 500 == 0:
            echo(f"  teacher step {step}: mean loss {loss_sum / 500:.4f}, {time.perf_counter() - start:.0f} s")
            loss_sum = 0.0
    return ema, _report(step, cfg.batch, start)


# ---------------------------------------------------------------------------------------------------
# GAN: StyleGAN2's objective (Karras et al. 2020): non-saturating logistic loss
#   L_D = softplus(D(G(z))) + softplus(−D(x)) + (γ/2)·‖∇_x D(x)‖²   (R1 on reals, lazily every k steps ×k)
#   L_G = softplus(−D(G(z)))
# with Adam (0, 0.99) and an EMA of G (the generator that is kept).

class Discriminator(nn.Module):
    """StyleGAN2's discriminator ('orig' architecture) at small width, built from the generator's own
    equalised-learning-rate layers (weights N(0, 1), scaled by 1/sqrt(fan_in) at run time, so Adam's step
    is the same relative size in every layer): a 1x1 from-image, per resolution a 3x3 conv and a 3x3 conv
    with 2x FIR downsampling ([1, 3, 3, 1]), then at 4 px the minibatch standard deviation (one extra
    feature map), a 3x3 conv and two fully connected layers to one logit. All activations lrelu (gain √2).
    """

    def __init__(self, img_channels: int = 1, resolution: int = 32, channels: Sequence[int] = (32, 64, 64),
                 mbstd_group: int = 4):
        super().__init__()
        self.mbstd_group = mbstd_group
        self.from_img = Conv2dLayer(img_channels, channels[0], 1, activation="lrelu")
        widths = [*channels, channels[-1]]
        self.blocks = nn.Sequential(*(nn.Sequential(Conv2dLayer(a, a, 3, activation="lrelu"),
                                                    Conv2dLayer(a, b, 3, activation="lrelu", down=2))
                                      for a, b in zip(widths[:-1], widths[1:])))
        final = resolution >> len(channels)
        self.conv = Conv2dLayer(widths[-1] + 1, widths[-1], 3, activation="lrelu")
        self.fc = FullyConnectedLayer(widths[-1] * final * final, widths[-1], activation="lrelu")
        self.out = FullyConnectedLayer(widths[-1], 1)

    def minibatch_std(self, x: torch.Tensor) -> torch.Tensor:
        """Append the mean over (C, H, W) of the per-group standard deviation as one more channel."""
        n, c, h, w = x.shape
        g = min(self.mbstd_group, n)
        y = x.reshape(g, -1, c, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [n / g]
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.minibatch_std(self.blocks(self.from_img(x))))
        return self.out(self.fc(x.flatten(1))).squeeze(1)


@dataclass
class GANTraining:
    batch: int = 64
    lr_g: float = 0.0025
    lr_d: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 0.5  # of 0.05 and 0.5 (same 200 s on an H100), 0.5 learnt fastest (FD 67 vs 107 at 64 kimg)
    r1_every: int = 16
    ema_halflife_kimg: float = 2.0
    ema_rampup: float = 0.05
    snapshot_kimg: Sequence[float] = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384)
    seed: int = 2


def train_gan(G: StyleGAN2Network, images: torch.Tensor, cfg: GANTraining, budget: Budget,
              echo: Callable[[str], None] = print
              ) -> tuple[dict[float, dict[str, torch.Tensor]], dict[str, Any]]:
    """Trains G against a fresh Discriminator; returns ({kimg: G_ema state dict (CPU)} at each of
    `snapshot_kimg` reached, plus the last one), report)."""
    device = images.device
    rng = torch.Generator(device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    D = Discriminator(G.img_channels, G.img_resolution).to(device)
    G.train().requires_grad_(True)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
    snapshots: dict[float, dict[str, torch.Tensor]] = {}
    pending = sorted(cfg.snapshot_kimg)
    step, start = 0, time.perf_counter()
    keep_going = budget.loop()

    def fake(n: int) -> torch.Tensor:
        return G(torch.randn([n, G.z_dim], generator=rng, device=device), None, force_fp32=True)

    def take_snapshot() -> None:
        state = G_ema.state_dict()
        snapshots[step * cfg.batch / 1000] = {k: v.detach().cpu().clone() for k, v in state.items()}

    while keep_going(step):
        # D step (with lazy R1 on reals every r1_every steps).
        real = random_batch(images, cfg.batch, rng)
        with torch.no_grad():
            generated = fake(cfg.batch)
        loss_d = F.softplus(D(generated)).mean() + F.softplus(-D(real)).mean()
        if step % cfg.r1_every == 0:
            real = real.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
            loss_d = loss_d + cfg.r1_gamma / 2 * grad.square().sum(dim=(1, 2, 3)).mean() * cfg.r1_every
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # G step.
        loss_g = F.softplus(-D(fake(cfg.batch))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step += 1
        update_ema(G_ema, G, ema_beta(cfg.batch, step * cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup))
        if pending and step * cfg.batch >= pending[0] * 1000:
            pending.pop(0)
            take_snapshot()
            echo(f"  GAN snapshot at {step * cfg.batch / 1000:g} kimg: loss D {float(loss_d.detach()):.3f}, "
                 f"G {float(loss_g.detach()):.3f}, {time.perf_counter() - start:.0f} s")
    if step * cfg.batch / 1000 not in snapshots:
        take_snapshot()
    return snapshots, _report(step, cfg.batch, start)


# ---------------------------------------------------------------------------------------------------
# Classifier: cross-entropy, Adam, random ±2 px shifts (the padding margin) as augmentation.

@dataclass
class ClassifierTraining:
    batch: int = 64
    lr: float = 1e-3
    shift: int = 2
    seed: int = 3
    config: ClassifierConfig = field(default_factory=ClassifierConfig)


def random_shift(x: torch.Tensor, shift: int, rng: torch.Generator) -> torch.Tensor:
    """Translate each image by (dy, dx) ∈ [−shift, shift]² with background (−1) filling in."""
    n, c, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    d = torch.randint(0, 2 * shift + 1, (2, n), generator=rng, device=rng.device).to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + d[0][:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None] + d[1][:, None])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, cfg: ClassifierTraining, budget: Budget,
                     echo: Callable[[str], None] = print) -> tuple[DomainClassifier, dict[str, Any]]:
    device = images.device
    rng = torch.Generator(device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = DomainClassifier(cfg.config).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step, start = 0, time.perf_counter()
    keep_going = budget.loop()
    while keep_going(step):
        idx = torch.randint(len(images), (cfg.batch,), generator=rng, device=rng.device).to(images.device)
        x = random_shift(images[idx], cfg.shift, rng) if cfg.shift else images[idx]
        loss = F.cross_entropy(net(x)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 1000 == 0:
            echo(f"  classifier step {step}: loss {float(loss):.3f}")
    return net.eval().requires_grad_(False), _report(step, cfg.batch, start)


@torch.no_grad()
def accuracy(net: DomainClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    correct = sum(int((net(images[i:i + batch])[1].argmax(1) == labels[i:i + batch]).sum())
                  for i in range(0, len(images), batch))
    return correct / len(images)


def fp16_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors as stored in the assets: floating point in float16, on the CPU."""
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).clone()
            for k, v in module.state_dict().items()}


def load_fp16_state(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load stored (float16) tensors into a float32 module."""
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return module



# ---------------------------------------------------------------------------------------------------
# The build: train everything into a work folder (phase 1, wants a GPU), then write the asset folder
# with the chosen GAN snapshot and reference outputs computed on the CPU (phase 2).

@dataclass
class BuildSettings:
    device: str = "cpu"
    teacher_seconds: float = 3000.0
    gan_seconds: float = 200.0  # on an H100: about 180 kimg
    classifier_seconds: float = 900.0
    max_steps: int = 1 << 40  # per trainer (tiny test builds)
    teacher_samples: int = 2000  # seeds 0 .. N-1 of the 18-step Heun sampler
    split_seed: int = 0  # permutation of the test set: first half held out (floor), second half reference
    teacher: TeacherTraining = field(default_factory=TeacherTraining)
    gan: GANTraining = field(default_factory=GANTraining)
    classifier: ClassifierTraining = field(default_factory=ClassifierTraining)


def test_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out indices, reference indices): a seeded permutation of the n test images cut in half."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n // 2], perm[n // 2:]


@torch.no_grad()
def teacher_samples(net: EDMPrecond, seeds: Sequence[int], batch: int = 500) -> torch.Tensor:
    """uint8 samples of the 18-step Heun sampler (EDM defaults), one random stream per seed."""
    from teachers.edm_loader import EDMTeacher
    from teachers.sampler import SamplerConfig, SeededNoise, edm_sample

    teacher = EDMTeacher(net.eval())
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(seeds), batch):
        noise = SeededNoise(seeds[i:i + batch], device)
        latents = noise.randn(teacher.data_shape)
        out.append(quantize(edm_sample(teacher, latents, cfg=SamplerConfig(num_steps=18),
                                       randn_like=noise.randn_like).float()).cpu())
    return torch.cat(out)


PARTS = ("classifier", "teacher", "samples", "gan", "scores")


class _Work:
    """The work folder of a build: the data on the build device and file helpers."""

    def __init__(self, work: Path, settings: BuildSettings):
        from refiner.demo.fashion_mnist import load_split, to_images

        self.path, self.settings = work, settings
        self.device = torch.device(settings.device)
        work.mkdir(parents=True, exist_ok=True)
        train_u8, train_labels = load_split("train")
        test_u8, test_labels = load_split("test")
        self.train = to_images(train_u8).to(self.device)
        self.test = to_images(test_u8).to(self.device)
        self.train_labels = torch.as_tensor(train_labels, device=self.device)
        self.test_labels = torch.as_tensor(test_labels, device=self.device)
        self.held_out, self.reference = test_split(len(self.test), settings.split_seed)

    def save(self, name: str, obj: Any) -> None:
        from fileformats.atomic import atomic_open

        with atomic_open(self.path / name) as f:
            torch.save(obj, f)

    def load(self, name: str) -> Any:
        if not (self.path / name).is_file():
            raise FileNotFoundError(f"{self.path / name} is missing: build the part that writes it first")
        return torch.load(self.path / name, map_location=self.device, weights_only=True)


def chunks(u8: torch.Tensor, size: int = 1000):
    return (u8[i:i + size] for i in range(0, len(u8), size))


def build_part(part: str, work: Path, settings: BuildSettings, echo: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """Phase 1, one part at a time; 'classifier', 'teacher' and 'gan' may run in parallel processes:
    'classifier' -> classifier.pt, stats.pt; 'teacher' -> teacher.pt; 'samples' -> teacher_samples.pt
    (needs teacher.pt); 'gan' -> gan_snapshots.pt; 'scores' (needs all) -> the domain FD and classifier
    score of the held-out real images (noise floor), the teacher's samples and every GAN snapshot.
    Each writes part-PART.json (what it did, seconds, settings); `merge_parts` makes build.json."""
    from dataclasses import asdict

    from fileformats.atomic import atomic_write_text
    from metrics.classifier import class_shares, domain_scores, embed

    torch.backends.cuda.matmul.allow_tf32 = False  # samples and statistics must match a CPU run
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    w = _Work(work, settings)
    budget = {"classifier": settings.classifier_seconds, "teacher": settings.teacher_seconds,
              "gan": settings.gan_seconds}.get(part)
    budget = Budget(budget, settings.max_steps) if budget is not None else None
    n = settings.teacher_samples
    if part == "classifier":
        net, info = train_classifier(w.train, w.train_labels, settings.classifier, budget, echo)
        net = DomainClassifier.from_state(net.config_json(), fp16_state(net)).to(w.device)  # as stored
        info["config"] = net.config_json()
        info["test_accuracy"] = accuracy(net, w.test, w.test_labels)
        w.save("classifier.pt", fp16_state(net))
        train_f = embed(net, chunks(quantize(w.train)))
        ref_f = embed(net, chunks(quantize(w.test[w.reference.to(w.device)])))
        stats = {"test_mu": ref_f.stats.mean, "test_cov": ref_f.stats.cov,
                 "train_mu": train_f.stats.mean, "train_cov": train_f.stats.cov}
        w.save("stats.pt", {k: torch.from_numpy(v) for k, v in stats.items()})
    elif part == "teacher":
        torch.manual_seed(settings.teacher.seed)  # the initial weights
        teacher, info = train_teacher(build_teacher().to(w.device), w.train, settings.teacher, budget, echo)
        w.save("teacher.pt", fp16_state(teacher))
    elif part == "samples":
        teacher = load_fp16_state(build_teacher(), w.load("teacher.pt")).to(w.device)
        w.save("teacher_samples.pt", {"images": teacher_samples(teacher, list(range(n)))})
        info = {"seeds": [0, n]}
    elif part == "gan":
        torch.manual_seed(settings.gan.seed)  # the initial weights
        snapshots, info = train_gan(build_generator().to(w.device), w.train, settings.gan, budget, echo)
        w.save("gan_snapshots.pt", {f"{kimg:g}": {k: v.half() for k, v in state.items()}
                                    for kimg, state in snapshots.items()})
    elif part == "scores":
        from metrics.evaluate import generated_batches
        from refiner.demo.assets import EVAL_SEED, demo_generator

        config = json.loads((work / "part-classifier.json").read_text())["config"]
        classifier = DomainClassifier.from_state(config, w.load("classifier.pt")).to(w.device)
        stats = {k: v.cpu().numpy() for k, v in w.load("stats.pt").items()}

        def scores(batches, reference: str = "test") -> dict[str, Any]:
            features = embed(classifier, batches)
            return {**domain_scores(features, stats[f"{reference}_mu"], stats[f"{reference}_cov"]),
                    "class_shares": class_shares(features).round(4).tolist()}

        held_out = quantize(w.test[w.held_out[:n].to(w.device)])
        info = {"samples": n, "floor": {ref: scores(chunks(held_out), ref) for ref in ("test", "train")},
                "teacher": scores(chunks(w.load("teacher_samples.pt")["images"][:n])), "gan": {}}
        for kimg, state in w.load("gan_snapshots.pt").items():
            G = demo_generator(GAN_CONFIG.to_init_kwargs(), state, w.device)
            info["gan"][kimg] = scores(generated_batches(G, n, batch_size=500, seed=EVAL_SEED))
    else:
        raise ValueError(f"unknown part {part!r}; one of {PARTS}")
    info["part_seconds"] = round(time.perf_counter() - start, 1)
    info["settings"] = asdict(settings)
    info["threads"] = torch.get_num_threads()
    info["device"] = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else "cpu"
    atomic_write_text(work / f"part-{part}.json", json.dumps(info, indent=1) + "\n")
    echo(f"{part}: " + json.dumps({k: v for k, v in info.items() if k != "settings"}))
    return info


def merge_parts(work: Path) -> dict[str, Any]:
    """build.json: settings, data hashes, versions, every part's report and the scores."""
    from fileformats.atomic import atomic_write_text
    from refiner.demo.fashion_mnist import data_hash

    parts = {p: json.loads((work / f"part-{p}.json").read_text()) for p in PARTS}
    settings = parts["classifier"].pop("settings")
    for p in ("teacher", "gan"):  # each part's own settings (parts may run as separate processes)
        own = parts[p].pop("settings")
        settings[p], settings[f"{p}_seconds"] = own[p], own[f"{p}_seconds"]
    settings["teacher_samples"] = parts["samples"].pop("settings")["teacher_samples"]
    scores = parts["scores"]
    devices = {p: parts[p]["device"] + (f", {parts[p]['threads']} thread(s)" if parts[p]["device"] == "cpu" else "")
               for p in PARTS}
    info = {"settings": settings, "data": data_hash(), "torch": torch.__version__, "part_devices": devices,
            "classifier": parts["classifier"], "floor": scores["floor"],
            "teacher": {**parts["teacher"], "sampling_seconds": parts["samples"]["part_seconds"],
                        "scores": scores["teacher"]},
            "gan": {**parts["gan"], "snapshots": scores["gan"]},
            "wall_seconds": round(sum(p["part_seconds"] for p in parts.values()), 1)}
    atomic_write_text(work / "build.json", json.dumps(info, indent=2) + "\n")
    return info


# The GAN must be clearly imperfect, in a way the refinement can mend. Diff-Instruct's divergence is
# mode-seeking: it sharpens the samples of every class the generator makes but does not add a class it
# misses. So the demo uses the first snapshot in which every class holds at least MIN_SHARE of the samples
# and none more than MAX_SHARE (the classifier's argmax), however poor its FD.
MIN_SHARE, MAX_SHARE = 0.01, 0.30


def select_snapshot(build: dict[str, Any], min_share: float = MIN_SHARE, max_share: float = MAX_SHARE
                    ) -> tuple[str, str]:
    """(kimg, reason): the first snapshot whose class shares all lie in [min_share, max_share], else the last."""
    snapshots = build["gan"]["snapshots"]
    for kimg in sorted(snapshots, key=float):
        shares = snapshots[kimg]["class_shares"]
        if min(shares) >= min_share and max(shares) <= max_share:
            return kimg, (f"first snapshot in which every class holds {min_share:.0%}..{max_share:.0%} of the "
                          f"samples ({min(shares):.1%}..{max(shares):.1%}); FD {snapshots[kimg]['fd']:.2f}")
    last = max(snapshots, key=float)
    return last, f"no snapshot has every class within {min_share:.0%}..{max_share:.0%} of the samples; the last one"


def _reference_outputs(teacher: EDMPrecond, generator: nn.Module, classifier: DomainClassifier,
                       samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fixed inputs and what the stored networks (float16 weights, float32 arithmetic) give on the CPU."""
    rng = torch.Generator().manual_seed(0)
    x = torch.randn([2, *teacher_shape(teacher)], generator=rng)
    sigma = torch.tensor([0.3, 3.0])
    z = torch.randn([2, generator.z_dim], generator=rng)
    with torch.no_grad():
        features, logits = classifier(samples[:4].float() / 127.5 - 1)
        return {"teacher_x": x, "teacher_sigma": sigma, "teacher_out": teacher(x, sigma),
                "generator_z": z, "generator_out": generator(z),
                "classifier_in": samples[:4].clone(), "classifier_features": features,
                "classifier_logits": logits}


def teacher_shape(net: EDMPrecond) -> tuple[int, int, int]:
    return (net.img_channels, net.img_resolution, net.img_resolution)


def finalize(work: Path, out: Path, gan_kimg: str, selection: str, extra: dict[str, Any] | None = None,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Phase 2: write the asset folder `out` from a work folder with GAN snapshot `gan_kimg`: the network
    files, reference outputs and manifest.json. Returns the manifest."""
    from fileformats.atomic import atomic_copy, atomic_open, atomic_write_text
    from fileformats.sources import file_sha256
    from refiner.demo.assets import ASSETS_FORMAT, demo_generator

    build = json.loads((work / "build.json").read_text())
    snapshots = torch.load(work / "gan_snapshots.pt", map_location="cpu", weights_only=True)
    if gan_kimg not in snapshots:
        raise ValueError(f"no GAN snapshot at {gan_kimg} kimg; there are {sorted(snapshots, key=float)}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("teacher.pt", "classifier.pt", "stats.pt", "teacher_samples.pt"):
        atomic_copy(work / name, out / name)
    with atomic_open(out / "generator.pt") as f:
        torch.save(snapshots[gan_kimg], f)

    def load(name: str) -> Any:
        return torch.load(out / name, map_location="cpu", weights_only=True)

    teacher = load_fp16_state(build_teacher(), load("teacher.pt")).eval()
    classifier_cfg = build["classifier"]["config"]
    classifier = DomainClassifier.from_state(classifier_cfg, load("classifier.pt"))
    generator = demo_generator(GAN_CONFIG.to_init_kwargs(), snapshots[gan_kimg])
    samples = load("teacher_samples.pt")["images"]
    with atomic_open(out / "reference.pt") as f:
        torch.save(_reference_outputs(teacher, generator, classifier, samples), f)
    settings = build["settings"]
    manifest = {
        "format": ASSETS_FORMAT,
        "about": "refiner's demo assets, built by scripts/build_demo_assets.py from Fashion-MNIST (MIT licence)",
        "data": {"name": "Fashion-MNIST", "sha256": build["data"],
                 "preprocessing": "28x28 padded by 2 px of background to 32x32, x/127.5 - 1, one channel"},
        "split": {"seed": settings["split_seed"], "held_out": 5000, "reference": 5000,
                  "rule": "torch.randperm(10000, generator=manual_seed(seed)): first half held out (noise "
                          "floor images), second half gives the reference statistics"},
        "networks": {
            "teacher": {"file": "teacher.pt", "class": "EDMPrecond (SongUNet, DDPM++)",
                        "init_kwargs": TEACHER_KWARGS, "training": settings["teacher"],
                        "report": build["teacher"]},
            "generator": {"file": "generator.pt", "class": "StyleGAN2 Generator", "config": GAN_CONFIG.to_init_kwargs(),
                          "training": settings["gan"], "report": {k: v for k, v in build["gan"].items()
                                                                  if k != "snapshots"},
                          "kimg": float(gan_kimg), "selection": selection,
                          "snapshots_fd": {k: v["fd"] for k, v in build["gan"]["snapshots"].items()}},
            "classifier": {"file": "classifier.pt", "config": classifier_cfg, "training": settings["classifier"],
                           "report": build["classifier"]},
        },
        "stats": {"file": "stats.pt", "what": "float64 mean and covariance of the classifier features: test_* "
                                              "of the reference half of the test set, train_* of the training set"},
        "teacher_samples": {"file": "teacher_samples.pt", "seeds": [0, settings["teacher_samples"]],
                            "sampler": "EDM Heun, 18 steps (35 network calls), sigma 0.002..80, rho 7, "
                                       "one torch.Generator per seed (teachers.sampler.SeededNoise)",
                            "seconds": build["teacher"].get("sampling_seconds")},
        "reference": {"file": "reference.pt", "what": "fixed inputs and the outputs of the stored networks "
                                                      "(float32 arithmetic on the CPU)"},
        "measured": {"samples": settings["teacher_samples"], "teacher": build["teacher"]["scores"],
                     "floor": build["floor"], "generator": build["gan"]["snapshots"][gan_kimg]},
        "distill": {"sigma_init": 2.5},
        "build": {"torch": build["torch"], "part_devices": build["part_devices"], "wall_seconds": build["wall_seconds"],
                  "seeds": {"teacher": settings["teacher"]["seed"], "gan": settings["gan"]["seed"],
                            "classifier": settings["classifier"]["seed"], "split": settings["split_seed"]}},
        **(extra or {}),
    }
    files = ("teacher.pt", "generator.pt", "classifier.pt", "stats.pt", "teacher_samples.pt", "reference.pt")
    manifest["files"] = {name: file_sha256(out / name) for name in files}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    echo(f"wrote {out}: " + ", ".join(f"{n} {(out / n).stat().st_size / 1e6:.2f} MB" for n in files))
    return manifest
