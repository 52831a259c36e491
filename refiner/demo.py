"""The built-in demo (`refiner demo`, what `make demo` runs): the whole mission on real images, offline, on
a laptop CPU in minutes.

The committed assets (assets/demo/, built by scripts/build_demo_assets.py) hold a small EDM teacher and a
small, deliberately under-trained StyleGAN2 generator, both trained on Fashion-MNIST (32x32, one channel),
a Fashion-MNIST classifier whose penultimate features give a domain Fréchet distance (FD) and whose
softmax gives a classifier score (metrics/classifier.py), reference statistics, and the teacher's own
samples (18-step Heun sampler, 35 network calls each: made at build time, as on two CPU cores they would
take longer than the whole demo).

The demo measures FD and classifier score of the generator, of the teacher's samples and of real test
images (the noise floor: one half of the test set against the statistics of the other half), refines the
generator with the Diff-Instruct loop (job 'refine'), or distils the teacher into a one-step generator
(job 'distill'), measures again and writes a report with grids of the same seeds before and after.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fileformats.atomic import atomic_open
from fileformats.errors import UserError
from fileformats.sources import file_sha256
from gan_adapters.stylegan2 import Generator, GeneratorConfig
from gan_adapters.stylegan2_adapter import StyleGAN2Generator, StyleGAN2Options, _Snapshot
from metrics.classifier import DomainClassifier, domain_scores, embed
from metrics.evaluate import generated_batches
from metrics.images import quantize, save_image_grid
from refiner.config import SHORT_RUN_LOSS_OPTIONS, TrainConfig
from refiner.losses import get_loss
from refiner.realdata import RealData, TensorData, check_data_option, open_real_data
from teachers.edm_loader import EDMTeacher, network_record
from teachers.edm_precond import EDMPrecond

DEFAULT_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
ASSETS_FORMAT = "refiner-demo-assets/1"
GENERATOR_FORMAT = "refiner-demo-generator/1"
EVAL_SEED = 1  # latents of the metric samples (the grids use seed 0, as every image job)

# The demo's refinement: sized so that it ends in minutes on two CPU cores. From the sweep in the manifest
# (`sweep`, 34 runs): σ drawn around 1 (ln σ ~ N(0, 1.2²)) rather than EDM's training distribution
# (N(−1.2, 1.2²)) is what made the FD fall steadily: at small σ the fake score's error, not the generator's,
# dominates D_fake − D_teacher. Learning rates above 3e-4 or a faster fake network made the FD oscillate.
DEMO_REFINE = TrainConfig(steps=600, batch=16, lr=3e-4, fake_lr=3e-4, betas=(0.0, 0.99), ema=0.0, p_mean=0.0,
                          fake_warmup=20, log_every=10, device="cpu", loss_option_defaults=SHORT_RUN_LOSS_OPTIONS)
DEMO_DISTILL = TrainConfig(steps=150, batch=16, lr=1e-4, fake_lr=1e-4, betas=(0.0, 0.99), ema=0.0,
                           fake_warmup=20, log_every=10, device="cpu", loss_option_defaults=SHORT_RUN_LOSS_OPTIONS)
JOBS = {"refine": DEMO_REFINE, "distill": DEMO_DISTILL}


def echo_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Assets

@dataclass
class DemoAssets:
    """Everything the demo loads from assets/demo (manifest.json says what each file is)."""

    path: Path
    manifest: dict[str, Any]
    teacher: EDMTeacher
    classifier: DomainClassifier
    stats: dict[str, np.ndarray]  # test_mu / test_cov (reference half of the test set), train_mu / train_cov
    teacher_samples: torch.Tensor  # uint8 [N, 1, 32, 32]
    generator_state: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]  # fixed inputs and the outputs the networks gave at build time

    def generator(self, device: torch.device | str = "cpu") -> StyleGAN2Generator:
        """A fresh trainable copy of the demo GAN behind the Generator interface."""
        return demo_generator(self.manifest["networks"]["generator"]["config"], self.generator_state, device)


def _load_tensors(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or git-lfs pointer file: say which and what to do
        raise UserError(f"cannot read demo asset {path} ({type(e).__name__}: {e}); restore it from the "
                        "repository or rebuild with scripts/build_demo_assets.py") from None


def load_assets(path: str | Path | None = None, device: torch.device | str = "cpu", check: bool = True
                ) -> DemoAssets:
    """Load and (with `check`) verify the sha256 of every asset file against the manifest."""
    path = Path(path) if path is not None else DEFAULT_ASSETS
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"no demo assets in {path} (manifest.json missing); give --assets DIR or rebuild "
                        "them with scripts/build_demo_assets.py")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != ASSETS_FORMAT:
        raise UserError(f"{manifest_path}: format {manifest.get('format')!r}, expected {ASSETS_FORMAT!r}; "
                        "rebuild the assets with this version's scripts/build_demo_assets.py")
    files = manifest["files"]
    if check:
        for name, digest in files.items():
            if not (path / name).is_file() or file_sha256(path / name) != digest:
                raise UserError(f"demo asset {path / name} is missing or differs from the manifest (sha256); "
                                "restore it from the repository or rebuild with scripts/build_demo_assets.py")
    nets = manifest["networks"]
    teacher_net = EDMPrecond(**nets["teacher"]["init_kwargs"])
    teacher_state = _load_tensors(path / nets["teacher"]["file"])
    teacher_net.load_state_dict({k: v.float() for k, v in teacher_state.items()})
    record = network_record(teacher_net.eval(), nets["teacher"]["init_kwargs"])
    teacher = EDMTeacher(teacher_net.to(device), record)
    classifier = DomainClassifier.from_state(nets["classifier"]["config"],
                                             _load_tensors(path / nets["classifier"]["file"])).to(device)
    stats = {k: v.numpy() for k, v in _load_tensors(path / manifest["stats"]["file"]).items()}
    samples = _load_tensors(path / manifest["teacher_samples"]["file"])["images"]
    return DemoAssets(path, manifest, teacher, classifier, stats, samples,
                      _load_tensors(path / nets["generator"]["file"]),
                      _load_tensors(path / manifest["reference"]["file"]))


def demo_generator(config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
                   ) -> StyleGAN2Generator:
    """The demo's StyleGAN2 (our format: config = the original constructor kwargs, state = its tensors)."""
    network = Generator(GeneratorConfig.from_init_kwargs((), config))
    network.load_state_dict({k: v.float() for k, v in state.items()})
    return StyleGAN2Generator(network.eval(), _Snapshot({}, "demo generator"), StyleGAN2Options()).to(device)


def save_demo_generator(generator: nn.Module, path: Path) -> None:
    """Write a demo StyleGAN2 in our format (torch.load(weights_only=True) reads it)."""
    network = generator.network
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    with atomic_open(path) as f:
        torch.save({"format": GENERATOR_FORMAT, "config": network.cfg.to_init_kwargs(), "state": state}, f)


# ---------------------------------------------------------------------------------------------------
# Metrics

def uint8_batches(images: torch.Tensor, batch: int = 500):
    for i in range(0, len(images), batch):
        yield images[i:i + batch]


REFERENCES = ("test", "train")  # reference statistics: held-in half of the test set, or the training set


def make_evaluator(assets: DemoAssets, samples: int, reference: str = "test", batch: int = 100
                   ) -> Callable[[nn.Module], dict[str, float]]:
    """generator -> {'fd', 'cs'} on `samples` images (latents from EVAL_SEED) against `reference`."""
    def evaluate(generator: nn.Module) -> dict[str, float]:
        features = embed(assets.classifier, generated_batches(generator, samples, batch, seed=EVAL_SEED))
        return domain_scores(features, assets.stats[f"{reference}_mu"], assets.stats[f"{reference}_cov"])
    return evaluate


def score_images(assets: DemoAssets, images: torch.Tensor, reference: str = "test") -> dict[str, float]:
    """FD and classifier score of uint8 images [N, 1, 32, 32] against `reference`."""
    features = embed(assets.classifier, uint8_batches(images))
    return domain_scores(features, assets.stats[f"{reference}_mu"], assets.stats[f"{reference}_cov"])


def noise_floor(assets: DemoAssets, samples: int, reference: str, echo: Callable[[str], None]
                ) -> tuple[dict[str, float], str]:
    """Real test images (the half not in the reference) scored like a generator, live when Fashion-MNIST
    is installed, else the value measured at build time. Returns (scores, where they come from)."""
    from refiner.datasets import load_split, to_images

    split = assets.manifest["split"]
    try:
        images, _ = load_split("test")
    except UserError:
        echo("  Fashion-MNIST is not installed: the noise floor is the value measured at build time")
        return dict(assets.manifest["measured"]["floor"][reference]), "measured at build time"
    held_out = torch.randperm(len(images), generator=torch.Generator().manual_seed(split["seed"]))
    held_out = held_out[:split["held_out"]][:samples]
    real = quantize(to_images(images[held_out.numpy()]))
    return score_images(assets, real, reference), "live"


# ---------------------------------------------------------------------------------------------------
# The demo

@dataclass
class DemoResult:
    job: str
    fd_before: float
    fd_after: float
    fd_teacher: float
    fd_floor: float
    cs_before: float
    cs_after: float
    cs_teacher: float
    cs_floor: float
    floor_source: str
    samples: int
    steps: int
    batch: int
    seconds: float
    report: str

    @property
    def fd_change_pct(self) -> float:
        return 100 * (self.fd_after - self.fd_before) / self.fd_before

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "fd_change_pct": self.fd_change_pct}

    def table(self) -> str:
        what = {"refine": "StyleGAN2 refined by the EDM teacher (Diff-Instruct)",
                "distill": "EDM teacher distilled into a one-step generator (Diff-Instruct)"}[self.job]
        before = {"refine": "GAN before", "distill": "one-step before"}[self.job]
        after = {"refine": "GAN after refinement", "distill": "one-step after distillation"}[self.job]
        rows = [(before, self.fd_before, self.cs_before, ""),
                (after, self.fd_after, self.cs_after, f"FD {self.fd_change_pct:+.1f}%"),
                ("teacher, 18-step Heun", self.fd_teacher, self.cs_teacher, "35 network calls per image"),
                ("real test images (floor)", self.fd_floor, self.cs_floor, self.floor_source)]
        lines = [f"Fashion-MNIST 32x32: {what}; {self.steps} steps of batch {self.batch}, "
                 f"{self.samples} samples per metric, {self.seconds:.0f} s",
                 f"{'':28s}{'domain FD':>10s}{'class. score':>14s}",
                 *(f"{name:28s}{fd:10.3f}{cs:14.3f}   {note}".rstrip() for name, fd, cs, note in rows),
                 f"report: {self.report}"]
        return "\n".join(lines)


def demo_real_data(loss: str, data: str | None, teacher: nn.Module, options: dict | None = None) -> RealData | None:
    """Real images for the adversarial losses: --data, else the demo's own data, Fashion-MNIST's training set
    (padded to 32 px like the teacher's); None for the other losses."""
    if data is not None:
        check_data_option(loss, data, options)
        return open_real_data(data, teacher.data_shape, teacher.label_dim)
    if not get_loss(loss).uses_data(options):
        return None
    from refiner.datasets import load_split, to_images

    images, labels = load_split("train")
    one_hot = torch.eye(teacher.label_dim)[torch.from_numpy(labels)] if teacher.label_dim else None
    return TensorData(to_images(images), one_hot)


def run_demo(out: str | Path = "runs/demo", job: str = "refine", config: TrainConfig | None = None,
             samples: int = 2000, reference: str = "test", assets_path: str | Path | None = None,
             force: bool = False, resume: bool = False, metrics_at_snapshots: bool = False,
             echo: Callable[[str], None] = echo_err, data: str | None = None) -> DemoResult:
    """Measure, refine (or distil), measure again, write OUT/report.html; returns the numbers. `data`: real
    images for the adversarial losses (default: Fashion-MNIST's training set)."""
    from refiner.jobs import ImageJob, trainable_copy
    from teachers.base import resolve_device

    start = time.perf_counter()
    config = (config or JOBS[job]).validate()
    device = resolve_device(config.device)
    out = Path(out)
    echo(f"demo: loading the assets ({assets_path or DEFAULT_ASSETS})")
    assets = load_assets(assets_path, device)
    if samples > len(assets.teacher_samples):
        raise UserError(f"--samples {samples}: the assets hold {len(assets.teacher_samples)} teacher "
                        "samples; use at most that many")
    echo(f"demo: scoring the teacher's samples and real test images ({samples} each)")
    teacher_scores = score_images(assets, assets.teacher_samples[:samples], reference)
    floor_scores, floor_source = noise_floor(assets, samples, reference, echo)
    teacher = assets.teacher
    if job == "refine":
        generator = assets.generator(device)
    else:
        from gan_adapters.onestep import OneStepGenerator
        sigma_init = assets.manifest["distill"]["sigma_init"]
        generator = OneStepGenerator.from_teacher(teacher, sigma_init=sigma_init, name="demo teacher")
    fake = trainable_copy(teacher, config.augment > 0)
    real_data = demo_real_data(config.loss, data, teacher, config.loss_options)
    info = {"job": job, "data": "Fashion-MNIST, 32x32 (28 px padded), one channel",
            "teacher FD (18-step Heun samples)": f"{teacher_scores['fd']:.4f}",
            "noise floor FD (real test images)": f"{floor_scores['fd']:.4f} ({floor_source})",
            "metric": f"domain FD / classifier score, {samples} samples, reference: {reference} set"}
    refine = job == "refine"
    image_job = ImageJob(config=config, generator=generator, teacher=teacher, fake=fake, out=out,
                         device=device, save_generator=save_demo_generator if refine else _save_onestep,
                         output_name="generator-refined.pt" if refine else "generator-onestep.pkl",
                         evaluate=make_evaluator(assets, samples, reference),
                         metrics_at_snapshots=metrics_at_snapshots,
                         title=f"refiner demo ({job}): Fashion-MNIST", info=info, echo=echo, real_data=real_data)
    result = image_job.run(resume=resume, force=force)
    save_image_grid(assets.teacher_samples[:64], out / "grid-teacher.png")
    panels = {"before": out / "grid-before.png", "after": out / "grid-after.png",
              "teacher (18-step Heun)": out / "grid-teacher.png"}
    save_side_by_side(panels, out / "grids.png")
    return DemoResult(job=job, fd_before=result["before"]["fd"], fd_after=result["after"]["fd"],
                      fd_teacher=teacher_scores["fd"], fd_floor=floor_scores["fd"],
                      cs_before=result["before"]["cs"], cs_after=result["after"]["cs"],
                      cs_teacher=teacher_scores["cs"], cs_floor=floor_scores["cs"], floor_source=floor_source,
                      samples=samples, steps=result["steps"], batch=config.batch,
                      seconds=time.perf_counter() - start, report=str(out / "report.html"))


def save_side_by_side(panels: dict[str, Path], path: Path, scale: int = 2) -> None:
    """The grid images next to each other, enlarged `scale` times (nearest neighbour), titled."""
    from PIL import Image, ImageDraw

    images = [Image.open(p).convert("RGB") for p in panels.values()]
    images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    gap, title = 16, 22
    canvas = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) + 1),
                               max(im.height for im in images) + title + gap), "white")
    draw, x = ImageDraw.Draw(canvas), gap
    for name, im in zip(panels, images):
        draw.text((x, 4), name, fill=(0, 0, 0))
        canvas.paste(im, (x, title))
        x += im.width + gap
    with atomic_open(path) as f:
        canvas.save(f, format="PNG")


def _save_onestep(generator: nn.Module, path: Path) -> None:
    generator.save(path, overwrite=True)
