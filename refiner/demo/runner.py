"""The demo run (`refiner demo`, what `make demo` runs): the whole mission on real images, offline, on a
laptop CPU in minutes, with the committed assets (refiner.demo.assets).

The demo measures FD and classifier score of the generator, of the teacher's samples and of real test
images (the noise floor: one half of the test set against the statistics of the other half), refines the
generator with the loop (job 'refine'; loss sid by default, ikl for Diff-Instruct's), or distils the
teacher into a one-step generator (job 'distill'; loss ikl by default), measuring the FD at every quarter
of the training too, measures again and writes a report with grids of the same seeds before and after
beside the teacher's samples and real images, the FD curve, and where the wall time went (loading,
scoring, training, report).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from torch import nn

from common.errors import UserError
from fileformats.atomic import atomic_open
from metrics.classifier import domain_scores, embed
from metrics.evaluate import generated_batches
from metrics.images import quantize, save_image_grid
from refiner.config import SAME, SHORT_RUN_LOSS_OPTIONS, TrainConfig, resolve_config
from refiner.demo.assets import DEFAULT_ASSETS, EVAL_SEED, DemoAssets, load_assets, save_demo_generator
from refiner.losses import get_loss
from refiner.realdata import RealData, TensorData, check_data_option, open_real_data

# The demo's refinement: sized so that it ends in minutes on two CPU cores. From the sweep in the manifest
# (`sweep`, 34 runs, all with ikl): σ drawn around 1 (ln σ ~ N(0, 1.2²)) rather than EDM's training
# distribution (N(−1.2, 1.2²)) is what made ikl's FD fall steadily: at small σ the fake score's error, not the
# generator's, dominates D_fake − D_teacher. Learning rates above 3e-4 or a faster fake network made the FD
# oscillate. The loss: every loss at these settings and the default length (600 steps, 2000 samples, seed 0;
# README "Generator losses"): FD 66.99 -> ikl 45.33, dmd 40.38, sid 36.41 (its own σ: SiD's karras-t, which
# replaces the ln σ above). sid refines best of the losses that need no real images, so it is the default
# (`--loss ikl` runs the paper's loss with the σ above). The length: 450 steps, so that the demo ends in about
# 5 minutes on a slow two-core machine (with SPEED_DEFAULTS and 2 threads: 294-304 s there, FD 38.74; 279 s and
# FD 38.70 after the convolutions took their bias; 600 steps gave 34.97, 1.3x the time).
DEMO_REFINE = TrainConfig(steps=450, batch=16, lr=3e-4, fake_lr=3e-4, betas=(0.0, 0.99), ema=0.0, p_mean=0.0,
                          fake_warmup=20, log_every=10, device="cpu", loss="sid",
                          loss_option_defaults=SHORT_RUN_LOSS_OPTIONS)
# The distillation: ikl. At 100 steps (500 samples) dmd looked better (FD 168.6 -> 47.1 against ikl's 73.0),
# but at this length (150 steps, 2000 samples, seed 0) ikl reached 31.12 and dmd 37.76 (README "Generator
# losses"); dmd2, with its GAN head on real images, 36.8 at 100 steps.
DEMO_DISTILL = TrainConfig(steps=150, batch=16, lr=1e-4, fake_lr=1e-4, betas=(0.0, 0.99), ema=0.0,
                           fake_warmup=20, log_every=10, device="cpu", loss_option_defaults=SHORT_RUN_LOSS_OPTIONS)
JOBS = {"refine": DEMO_REFINE, "distill": DEMO_DISTILL}

# The FD during training: measured at every quarter of the steps, the first and the last point being the
# measurements before and after (on --samples images); the points between on CURVE_SAMPLES images with the
# same latents (a 2000-image measurement costs about as much as 40 training steps).
CURVE_POINTS = 4
CURVE_SAMPLES = 500
GRID_IMAGES = 64  # images in each grid of the report


def echo_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
                ) -> tuple[dict[str, float], str, torch.Tensor | None]:
    """Real test images (the half not in the reference) scored like a generator, live when Fashion-MNIST
    is installed, else the value measured at build time. Returns (scores, where they come from, the first
    GRID_IMAGES of those images as uint8, or None without Fashion-MNIST)."""
    from refiner.demo.fashion_mnist import load_split, to_images

    split = assets.manifest["split"]
    try:
        images, _ = load_split("test")
    except UserError:
        echo("  Fashion-MNIST is not installed: the noise floor is the value measured at build time")
        return dict(assets.manifest["measured"]["floor"][reference]), "measured at build time", None
    held_out = torch.randperm(len(images), generator=torch.Generator().manual_seed(split["seed"]))
    held_out = held_out[:split["held_out"]][:max(samples, GRID_IMAGES)]
    real = quantize(to_images(images[held_out.numpy()]))
    return score_images(assets, real[:samples], reference), "live", real[:GRID_IMAGES]


# The refinement's speed default: one fake-network pass serves both steps (--reuse-pass, README "Speed"), both
# steps drawing σ from the generator step's sampler (--fake-sigma same), wherever the loss allows it (not the
# losses that train a discriminator) and the user set none of them. At 600 steps (seed 0, 2000 samples) it took
# sid's FD to 34.97 (separate passes: 37.07 with the same σ, 36.39 with sid's own fake-score σ; ikl: 44.13
# instead of 45.33) at 0.82x the CPU time per step. Not for the distillation: its one-step generator moves
# fast, and a fake score one step behind made its FD oscillate (150 steps: 87.1 and 49.6 on two seeds against
# 31.1).
SPEED_DEFAULTS: dict[str, dict[str, Any]] = {"refine": {"fake_sigma": SAME, "reuse_pass": True}, "distill": {}}


def demo_config(job: str, given: dict[str, Any]) -> TrainConfig:
    """The demo run's TrainConfig: the job's defaults, the loss's, the user's options (`resolve_config`), then
    the job's SPEED_DEFAULTS where they apply and the user gave none of them (their source says so)."""
    plain = resolve_config(JOBS[job], given)
    speed = SPEED_DEFAULTS[job]
    if not speed or any(given.get(k) is not None for k in speed):
        return plain
    try:
        fast = resolve_config(JOBS[job], {**given, **speed})
    except UserError:  # a discriminator, --augment, --reuse-images, or a sampler option of the fake step's σ
        return plain
    return dataclasses.replace(fast, sources={**fast.sources, **dict.fromkeys(speed, "demo: speed")})


def with_curve_snapshots(config: TrainConfig) -> TrainConfig:
    """Snapshots (and so FD measurements) at every quarter of the steps, rounded up, unless the configuration
    sets its own cadence. Snapshot callbacks run on a forked random state: the training does not change."""
    if config.snapshot_every or config.steps < 2:
        return config
    return dataclasses.replace(config, snapshot_every=-(-config.steps // CURVE_POINTS),
                               sources={**config.sources, "snapshot_every": "demo: a quarter of the steps"})


def default_threads(physical_cores: int | None = None, usable_cpus: int | None = None,
                    busy: float | None = None, cap: int = 4) -> int:
    """Threads for torch on this machine: the idle physical cores (physical cores usable by this process
    minus the cores busy now), at least 1 and at most `cap` (the demo's networks are small: more threads
    mostly add synchronisation). An idle 8-core laptop gets 4, a shared machine whose cores are busy gets 1.
    `busy` is measured over half a second (psutil.cpu_percent), not read from the load average: that lags by
    minutes, so a machine that has just run `pip install` (what `make demo` does first) would look busy.
    Arguments default to psutil's and os's view of this machine."""
    logical = psutil.cpu_count(logical=True) or 1
    physical_cores = physical_cores or psutil.cpu_count(logical=False) or logical
    if usable_cpus is None:
        usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    if busy is None:
        busy = psutil.cpu_percent(interval=0.5) / 100 * logical
    cores = min(physical_cores, usable_cpus)
    return max(1, min(cap, round(cores - busy)))


# ---------------------------------------------------------------------------------------------------
# The demo

@dataclass
class DemoResult:
    job: str
    loss: str
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
    fd_during_training: list[dict[str, float]]  # {step, kimg, fd, cs, samples} from before to after
    seconds_by_part: dict[str, float]  # loading, scoring, training, report, setup: sums to `seconds`
    threads: int

    @property
    def fd_change_pct(self) -> float:
        return 100 * (self.fd_after - self.fd_before) / self.fd_before

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "fd_change_pct": self.fd_change_pct}

    def table(self) -> str:
        what = {"refine": f"StyleGAN2 refined by the EDM teacher (loss {self.loss})",
                "distill": f"EDM teacher distilled into a one-step generator (loss {self.loss})"}[self.job]
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
                 "FD during training: " + ", ".join(f"step {p['step']:.0f} {p['fd']:.2f}"
                                                    for p in self.fd_during_training) + self.curve_note(),
                 f"time: {self.seconds:.0f} s on {self.threads} thread{'s' * (self.threads > 1)} = "
                 + ", ".join(f"{part} {t:.0f} s" for part, t in self.seconds_by_part.items()),
                 f"report: {self.report}"]
        return "\n".join(lines)

    def curve_note(self) -> str:
        counts = sorted({p["samples"] for p in self.fd_during_training[1:-1]})
        return f" (between first and last: {counts[0]:.0f} samples)" if counts and counts != [self.samples] else ""


def demo_real_data(loss: str, data: str | None, teacher: nn.Module, options: dict | None = None) -> RealData | None:
    """Real images for the adversarial losses: --data, else the demo's own data, Fashion-MNIST's training set
    (padded to 32 px like the teacher's); None for the other losses."""
    if data is not None:
        check_data_option(loss, data, options)
        return open_real_data(data, teacher.data_shape, teacher.label_dim)
    if not get_loss(loss).uses_data(options):
        return None
    from refiner.demo.fashion_mnist import load_split, to_images

    images, labels = load_split("train")
    one_hot = torch.eye(teacher.label_dim)[torch.from_numpy(labels)] if teacher.label_dim else None
    return TensorData(to_images(images), one_hot)


def run_demo(out: str | Path = "runs/demo", job: str = "refine", config: TrainConfig | None = None,
             samples: int = 2000, reference: str = "test", assets_path: str | Path | None = None,
             force: bool = False, resume: bool = False, curve_samples: int = CURVE_SAMPLES,
             echo: Callable[[str], None] = echo_err, data: str | None = None) -> DemoResult:
    """Measure, refine (or distil) measuring at every quarter of the steps (on min(samples, curve_samples)
    images; the configuration's own snapshot_every, if set, instead), measure again, write OUT/report.html;
    returns the numbers. `data`: real images for the adversarial losses (default: Fashion-MNIST's training
    set)."""
    from common.devices import resolve_device
    from gan_adapters.writeback import WriteBack
    from refiner.jobs import ImageJob, trainable_copy

    start = time.perf_counter()
    config = with_curve_snapshots((config or demo_config(job, {})).validate())
    curve_samples = min(samples, curve_samples)
    device = resolve_device(config.device)
    out = Path(out)
    echo(f"demo: loading the assets ({assets_path or DEFAULT_ASSETS})")
    assets = load_assets(assets_path, device)
    if samples > len(assets.teacher_samples):
        raise UserError(f"--samples {samples}: the assets hold {len(assets.teacher_samples)} teacher "
                        "samples; use at most that many")
    loaded = time.perf_counter()
    echo(f"demo: scoring the teacher's samples and real test images ({samples} each)")
    teacher_scores = score_images(assets, assets.teacher_samples[:samples], reference)
    floor_scores, floor_source, real_images = noise_floor(assets, samples, reference, echo)
    scored = time.perf_counter()
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
            "metric": f"domain FD / classifier score, {samples} samples, reference: {reference} set",
            "threads": torch.get_num_threads()}
    if config.snapshot_every:
        info["FD during training"] = (f"every {config.snapshot_every} steps on {curve_samples} samples (the same "
                                      f"latents); the first and last points are the measurements before and "
                                      f"after ({samples} samples)")
    grids = {"teacher (18-step Heun)": assets.teacher_samples[:GRID_IMAGES].numpy()}
    if real_images is not None:
        grids["real test images"] = real_images.numpy()
    refine = job == "refine"
    image_job = ImageJob(config=config, generator=generator, teacher=teacher, fake=fake, out=out,
                         device=device, writer=WriteBack("generator-refined.pt", save_demo_generator) if refine
                         else WriteBack("generator-onestep.pkl"),
                         evaluate=make_evaluator(assets, samples, reference), metrics_at_snapshots=True,
                         evaluate_at_snapshots=make_evaluator(assets, curve_samples, reference),
                         reference_grids=grids, title=f"refiner demo ({job}): Fashion-MNIST", info=info,
                         echo=echo, real_data=real_data)
    result = image_job.run(resume=resume, force=force)
    report_start = time.perf_counter()
    panels = {"before": out / "grid-before.png", "after": out / "grid-after.png"}
    for (name, images), file in zip(grids.items(), ("grid-teacher.png", "grid-real.png")):
        save_image_grid(images, out / file)
        panels[name] = out / file
    save_side_by_side(panels, out / "grids.png")
    end = time.perf_counter()
    parts = {"loading": loaded - start, "scoring": scored - loaded + result["seconds"].get("scoring", 0.0),
             "training": result["seconds"].get("training", 0.0),
             "report": result["seconds"].get("report", 0.0) + end - report_start}
    parts["setup"] = max(0.0, end - start - sum(parts.values()))  # imports, network copies, run directory
    curve = [{**point, "samples": samples if point["step"] in (0, result["steps"]) else curve_samples}
             for point in image_job.metric_records()]
    return DemoResult(job=job, loss=config.loss, fd_before=result["before"]["fd"], fd_after=result["after"]["fd"],
                      fd_teacher=teacher_scores["fd"], fd_floor=floor_scores["fd"],
                      cs_before=result["before"]["cs"], cs_after=result["after"]["cs"],
                      cs_teacher=teacher_scores["cs"], cs_floor=floor_scores["cs"], floor_source=floor_source,
                      samples=samples, steps=result["steps"], batch=config.batch, seconds=end - start,
                      report=str(out / "report.html"), fd_during_training=curve,
                      seconds_by_part={k: round(v, 2) for k, v in parts.items()}, threads=torch.get_num_threads())


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
