"""Options shared by every training command (toy, refine, distill) and their mapping to TrainConfig."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import click

from common.errors import UserError
from fileformats.sources import check_sha256_text, is_url, open_source
from refiner.config import PRECISIONS, TEACHER_MODES, TRAINING_KEYS, TrainConfig, resolve_config
from refiner.losses import GENERATOR_LOSSES, describe_losses, loss_option_users
from refiner.sigma import ALL_SAMPLER_OPTIONS, SAME, SIGMA_SAMPLERS

LOSS_OPTION_HELP = {
    "alpha": "SiD's α in (D_r − D_f)·[(D_r − x) − α(D_r − D_f)] [loss sid: 1.2].",
    "huber_c": "SIM's pseudo-Huber constant per element: c = huber-c·√dim [loss sim: 0.00054].",
    "divergence": "Uni-Instruct's f-divergence: rkl, fkl, js. fkl and js weigh each sample by f''(r)·r² of the "
                  "density ratio r = p/q that a discriminator on the fake network's bottleneck estimates from "
                  "real images (--data) [loss uni: rkl].",
    "gan_weight": "Weight of the generator's adversarial term, in the authors' units [loss dmd2: 3e-3 (DMD2 "
                  "--gen_cls_loss_weight); loss sida: 1e-4 (SiDA --lsg_gan 0.01 / --lsg 100)].",
    "disc_weight": "Weight of the discriminator's loss next to the fake-score loss [loss dmd2: 1e-2 (DMD2 "
                   "--cls_loss_weight); loss sida: 1 (SiDA --lsd)].",
    "gan_levels": "DMD2's diffusion GAN: the head sees x + σε, σ uniform over the lowest N of 1000 Karras "
                  "levels; 0 = clean images [loss dmd2: 1000].",
    "gan_start_kimg": "SiDA: generator kimg (after --fake-warmup) before the adversarial term joins, mixed "
                      "0.5·SiD + 0.5·GAN from then on [loss sida: 100].",
}
SAMPLER_OPTION_HELP = {
    "p_mean": "Mean of ln σ (lognormal) [-1.2]. Higher weighs coarse structure more: the demo's refinement "
              "needed 0 instead of EDM's -1.2.",
    "p_std": "Std of ln σ (lognormal) [1.2].",
    "levels": "Levels of the Karras grid (karras) [1000].",
    "sigma_min": "Smallest σ of the Karras schedule (karras, karras-t) [0.002].",
    "sigma_max": "Largest σ of the Karras schedule (karras, karras-t) [80].",
    "rho": "ρ of the Karras schedule (karras, karras-t) [7].",
    "min_percent": "Lowest grid index drawn, as a fraction of the grid (karras; DMD2: 0.02) [0].",
    "max_percent": "Highest grid index drawn, as a fraction of the grid (karras; DMD2: 0.98) [1].",
    "t_max": "SiD's t_max: t ~ U[0, t_max/1000] on the Karras schedule (karras-t) [800].",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def loss_and_sigma_options(f: Callable) -> Callable:
    """--loss, every loss's own options, --sigma, --fake-sigma and every sampler's options; all default to
    None (= not given), resolved by `resolve_config`."""
    option_types = {o: FINITE_FLOAT if isinstance(d, float) else type(d)
                    for spec in GENERATOR_LOSSES.values() for o, d in spec.options.items()}
    sampler_types = {o: int if o == "levels" else FINITE_FLOAT for o in ALL_SAMPLER_OPTIONS}
    options = [
        click.option("--loss", default=None, metavar="NAME",
                     help=f"Generator loss: {describe_losses()}. [default: the job's or the preset's]"),
        *[click.option(_flag(o), o, type=option_types[o], default=None,
                       help=LOSS_OPTION_HELP.get(o, f"Option of loss {' / '.join(u)}."))
          for o, u in loss_option_users().items()],
        click.option("--sigma", type=click.Choice(list(SIGMA_SAMPLERS)), default=None,
                     help="Noise levels of the generator loss: lognormal = ln σ ~ N(p-mean, p-std²); karras = "
                          "uniform over the Karras sampling grid; karras-t = SiD's t ~ U[0, t-max/1000] on the "
                          "Karras schedule. [default: the loss's]"),
        click.option("--fake-sigma", type=click.Choice([SAME, *SIGMA_SAMPLERS]), default=None,
                     help="Noise levels of the fake-score loss: same = as --sigma. [default: the loss's]"),
        *[click.option(_flag(o), o, type=sampler_types[o], default=None, help=SAMPLER_OPTION_HELP[o])
          for o in ALL_SAMPLER_OPTIONS],
    ]
    for option in reversed(options):
        f = option(f)
    return f


def speed_options(f: Callable) -> Callable:
    """--reuse-images, --reuse-pass and --compile (default None = not given: off unless a preset says otherwise)."""
    options = [
        click.option("--reuse-images/--no-reuse-images", default=None,
                     help="The fake-score step after a generator step trains on that step's images (detached), "
                          "as DMD2 does, instead of a new generator batch: 8 network passes per iteration "
                          "instead of 9. [default: off]"),
        click.option("--reuse-pass/--no-reuse-pass", default=None,
                     help="One fake-network pass serves both updates: the fake score's denoising step trains on "
                          "the generator step's noisy images (its images, σ and noise, in the generator step's "
                          "network mode), and the generator step reads the fake score from that pass: 7 network "
                          "passes per iteration instead of 9 (ikl, dmd; sid-type losses 9 instead of 11). Both "
                          "steps must draw σ alike (--fake-sigma same); not with --augment or the losses that "
                          "train a discriminator. [default: off]"),
        click.option("--compile/--no-compile", default=None,
                     help="torch.compile the generator, teacher and fake score (minutes of compiling first; on "
                          "CPU it needs a C++ compiler); where compiling fails it warns once and runs eagerly. "
                          "[default: off]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


MAX_SEED = 2**63 - 1  # seeds are stored as int64 (checkpoints, .npz files)
MAX_BATCH = 1 << 16  # images per step: more does not fit the memory of one machine for any network here


class FiniteFloat(click.types.FloatParamType):
    """A float option that refuses inf and nan (an infinite --lr or a nan --p-mean ruins a run silently)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Device(click.ParamType):
    """A torch device name (auto, cpu, cuda, cuda:N), checked against this machine when parsed."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from common.devices import resolve_device

        try:
            resolve_device(str(value))
        except UserError as e:
            self.fail(str(e), param, ctx)
        return str(value)


FINITE_FLOAT = FiniteFloat()
DEVICE = Device()
SEED = click.IntRange(0, MAX_SEED)
BATCH = click.IntRange(1, MAX_BATCH)


def check_sha256(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of a sha256 option: 64 hex digits, lower-cased."""
    try:
        return check_sha256_text(value, param.opts[0])
    except UserError as e:
        raise click.BadParameter(str(e)) from None


def sha256_option(name: str) -> Callable:
    """--NAME-sha256 HEX: the expected sha256 of the file given to --NAME (see `fetch_source`)."""
    return click.option(f"--{name}-sha256", f"{name.replace('-', '_')}_sha256", default=None, metavar="HEX",
                        callback=check_sha256, help=f"Expected sha256 of the --{name} file (a URL is checked "
                                                    "before it is cached).")


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is not None:
        import torch

        torch.set_num_threads(value)


def threads_option(f: Callable) -> Callable:
    """--threads N: torch's CPU threads for this command (torch.set_num_threads, set as the options are read)."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, expose_value=False,
                        callback=_set_threads, metavar="N",
                        help="CPU threads (default: torch's, one per core). Give --threads 1 on a shared machine: "
                             "other programs holding the cores make several threads many times slower.")(f)


def command_inputs(kwargs: dict[str, Any], *sources: str | None) -> tuple[str, ...]:
    """Every file a training command reads (its sources, and --ref / --detector when given): what starting over
    in --out must not delete. Call it before `make_evaluator` removes the metric options from kwargs."""
    given = [*sources, kwargs.get("ref"), kwargs.get("detector")]
    return tuple(s for s in given if s is not None and not is_url(s))


def given_options(**options: Any) -> dict[str, Any]:
    """The loader options the user gave (those not None)."""
    return {k: v for k, v in options.items() if v is not None}


def resolution_option(f: Callable) -> Callable:
    """--resolution: the image size of a consistency-model state dict whose channel_mult is not a published
    one (the weights do not say it); passed to the generator loader as `resolution`."""
    return click.option("--resolution", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Image size of a consistency-model state dict with an unpublished channel_mult "
                             "(`refiner inspect` says when it is needed; the weights do not record it).")(f)


def fetch_source(source: str, sha256: str | None, option: str) -> str:
    """The local path to read for the value of --OPTION: a URL is downloaded into the cache (checked); with a
    sha256 a local file is checked too. Other values (a local path, a folder) are returned as given."""
    if sha256 is None and not is_url(source):
        return source
    if os.path.isdir(source):
        raise UserError(f"--{option}-sha256 checks a single file, but {source} is a folder; leave it out")
    return str(open_source(source, sha256=sha256))


def training_options(defaults: TrainConfig) -> Callable:
    """Decorator adding the common options. They default to None (= not given); --help shows the job's
    default, which a preset and the loss's defaults may replace (`resolve_config`)."""
    d = defaults

    def shown(value: Any) -> str:
        return "" if value is None else f" [default: {value}]"

    options = [
        click.option("--out", "out", type=click.Path(file_okay=False), required=True,
                     help="Run directory: config.json, log.jsonl, checkpoints/ and outputs."),
        click.option("--steps", type=int, default=None, help="Generator updates." + shown(d.steps)),
        click.option("--batch", type=BATCH, default=None,
                     help="Global batch size (split over processes)." + shown(d.batch)),
        click.option("--batch-gpu", type=BATCH, default=None,
                     help="At most this many images per network call on each process: its share of --batch runs "
                          "in chunks whose gradients are summed before one update (EDM's --batch-gpu). The same "
                          "update in less memory (per chunk: BatchNorm statistics, the networks' own random draws such "
                          "as dropout and StyleGAN noise, uni's and sida's batch means); must divide the batch of "
                          "each process. [default: the whole batch]"),
        click.option("--recompute-norms/--no-recompute-norms", default=None,
                     help="EDM U-Nets (teacher, fake score, EDM generators) recompute their GroupNorm + SiLU "
                          "(+ dropout) outputs in the backward instead of storing them: the same gradients with "
                          "about 30% less activation memory, for a few percent more time. [default: off]"),
        click.option("--winograd/--no-winograd", default=None,
                     help="On a CPU with AVX2, the EDM U-Nets' large float32 3x3 convolutions (at least 128 channels "
                          "in and out, maps of 16x16 or more) and their input gradients run by NNPACK's Winograd "
                          "kernels: a CIFAR-10 DDPM++ forward + backward 1.13x faster on a 2-core AVX2 machine, "
                          "results equal to float rounding (~1e-5 of their scale), as under cuDNN's benchmark mode on "
                          "a GPU. Measure it on yours (benchmarks/winograd.py): machines with AVX-512 may run oneDNN "
                          "faster. [default: off]"),
        click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=None,
                     help="On a GPU, cuDNN times its convolution algorithms once for each of the run's (fixed) shapes "
                          "and keeps the fastest, as the official loop does: the fp32 iteration of a CIFAR-10 DDPM++ "
                          "at batch 128 1.48x faster on an H200, bf16 unchanged; results equal to float rounding. "
                          "Off: cuDNN's heuristic choice, the same algorithms on every run. Process-wide; nothing on a "
                          "CPU. [default: on]"),
        click.option("--mmap-threshold", type=float, default=None, metavar="MIB",
                     help="CPU runs on Linux: tensors of at least MIB MiB get their own memory mapping, returned to "
                          "the system when freed, instead of coming from glibc's heap, where freed activations "
                          "fragment (process-wide). Lowers the peak RSS (CIFAR-10 DDPM++ at batch 8, 8 MiB: about "
                          "0.5 GB less) for page faults that cost more the more of the activations are that large. "
                          "[default: glibc's own, rising to 32]"),
        click.option("--seed", type=SEED, default=None, help="Random seed." + shown(d.seed)),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--force", is_flag=True, help="Delete an existing run in --out and start over."),
        click.option("--device", type=DEVICE, default=None, help="auto, cpu or cuda[:N]." + shown(d.device)),
        click.option("--lr", type=FINITE_FLOAT, default=None, help="Generator learning rate." + shown(d.lr)),
        click.option("--fake-lr", type=FINITE_FLOAT, default=None,
                     help="Fake-score network learning rate." + shown(d.fake_lr)),
        click.option("--ratio", type=int, default=None,
                     help="Fake-score updates per generator update." + shown(d.ratio)),
        click.option("--ema", type=FINITE_FLOAT, default=None,
                     help="EMA half-life of the generator in kimg (0 = no averaging)." + shown(d.ema)),
        click.option("--snapshot-every", type=int, default=None,
                     help="Generator updates between checkpoints (0 = at the end only)." + shown(d.snapshot_every)),
        click.option("--beta1", type=FINITE_FLOAT, default=None, help="Adam beta1." + shown(d.betas[0])),
        click.option("--beta2", type=FINITE_FLOAT, default=None, help="Adam beta2." + shown(d.betas[1])),
        click.option("--fake-warmup", type=int, default=None,
                     help="Fake-score updates before the first generator update." + shown(d.fake_warmup)),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="Mixed precision on CUDA: auto = bf16 on GPUs that support it, else fp32 (always "
                          "fp32 on CPU); config.json records the choice." + shown(d.precision)),
        click.option("--log-every", type=int, default=None,
                     help="Generator updates between log records." + shown(d.log_every)),
        click.option("--teacher-mode", type=click.Choice(TEACHER_MODES), default=None,
                     help="Generator step: eval = teacher and fake score without dropout; train-shared-dropout = "
                          "both in train mode with the same dropout masks (the official Diff-Instruct code)."
                          + shown(d.teacher_mode)),
        click.option("--augment", type=FINITE_FLOAT, default=None,
                     help="Probability of EDM's AugmentPipe on the fake-score step (official Diff-Instruct: "
                          "0.12; needs an EDM fake-score network); 0 = off." + shown(d.augment)),
    ]

    def decorate(f: Callable) -> Callable:
        f = speed_options(loss_and_sigma_options(f))
        for option in reversed(options):
            f = option(f)
        return f

    return decorate



def config_from_options(defaults: TrainConfig, kwargs: dict[str, Any],
                        preset_values: dict[str, Any] | None = None, **extra: Any) -> TrainConfig:
    """Build the run's TrainConfig from the parsed options (removing them from kwargs)."""
    given = {k: kwargs.pop(k) for k in TRAINING_KEYS if k in kwargs}
    return resolve_config(defaults, given, preset_values, **extra)


def run_options(kwargs: dict[str, Any]) -> tuple[str, bool, bool]:
    return kwargs.pop("out"), kwargs.pop("resume"), kwargs.pop("force")



def data_option(f: Callable) -> Callable:
    """--data: real images for the adversarial losses (what `refiner metrics` reads)."""
    return click.option("--data", "data_src", default=None, metavar="PATH",
                        help="Real images for the losses that train a discriminator (dmd2, sida, uni --divergence "
                             "fkl|js): an image folder, a dataset .zip "
                             "with dataset.json labels (conditional teachers) or an .npz of uint8 images; "
                             "area-downsampled to the teacher's resolution.")(f)


def metric_options(f: Callable) -> Callable:
    """--metrics/--ref/--detector/--frontend: metrics before the first step and after the last."""
    options = [
        click.option("--metrics", "metrics", default=None,
                     help="Metrics before and after, e.g. fid50k,is50k,kid50k (none by default)."),
        click.option("--ref", default=None, help="Reference images or mu/sigma .npz for FID / KID."),
        click.option("--detector", default=None, help="Inception weights: path or URL (see `refiner metrics`)."),
        sha256_option("detector"),
        click.option("--frontend", type=click.Choice(["nvidia", "pytorch-fid"]), default="nvidia",
                     show_default=True, help="Resize and scaling conventions of the detector."),
        click.option("--metrics-at-snapshots", is_flag=True, help="Also measure at every snapshot."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_evaluator(kwargs: dict[str, Any], device) -> Callable | None:
    """The evaluator the metric options ask for (None without --metrics); removes them from kwargs."""
    spec, ref, detector, detector_sha256, frontend = (kwargs.pop(k) for k in ("metrics", "ref", "detector",
                                                                             "detector_sha256", "frontend"))
    if spec is None:
        if ref is not None or detector is not None or detector_sha256 is not None:
            raise UserError("--ref / --detector are given without --metrics; add e.g. --metrics fid10k")
        return None
    from metrics.detector import load_detector
    from metrics.evaluate import evaluate, open_needed_reference, parse_metrics

    ref = open_needed_reference(parse_metrics(spec), ref)  # a bad reference is found now, before the networks
    if detector is not None:
        detector = fetch_source(detector, detector_sha256, "detector")
    net = load_detector(detector, frontend=frontend, device=device)
    return lambda generator: evaluate(generator, net, spec, ref=ref, frontend=frontend)
