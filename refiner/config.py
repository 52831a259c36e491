"""Configuration of a training run (shared by every job: toy, refine, distill)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import UserError
from fileformats.sources import is_url
from refiner import heap
from refiner.losses import GENERATOR_LOSSES, get_loss, loss_option_users
from refiner.sigma import ALL_SAMPLER_OPTIONS, SAME, SIGMA_SAMPLERS, check_sampler, sampler_options

# auto: bf16 autocast on a GPU that has it, else fp32 (resolve_precision); the others as named (on CUDA).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# How the generator step runs the teacher and the fake score: eval = both without dropout (our default);
# train-shared-dropout = both in train mode with the same dropout masks (the official Diff-Instruct code).
TEACHER_MODES = ("eval", "train-shared-dropout")


@dataclass
class TrainConfig:
    """Options of the Diff-Instruct loop. Defaults follow the official code where it has one
    (docs/diff_instruct.md §1.4, §2.1): Adam (0, 0.999), 1:1 fake:generator ratio, fake step first,
    EDM log-normal σ, EMA half-life 0.5 Mimg with ramp-up 0.05."""

    steps: int = 1000  # generator updates
    batch: int = 64  # global batch (split over processes)
    # At most this many images per network call on each process: the batch of each process runs in chunks whose
    # gradients add up before one optimiser step (EDM's --batch-gpu). The same update for less memory; None = the
    # whole batch at once.
    batch_gpu: int | None = None
    # The EDM U-Nets recompute their GroupNorm → SiLU (→ dropout) outputs in the backward instead of storing them:
    # the same gradients in about 30% less activation memory (teachers.edm_layers.recompute_norms).
    recompute_norms: bool = False
    # The EDM U-Nets' large float32 3×3 convolutions on the CPU run by NNPACK's Winograd kernels: faster on AVX2
    # machines, the same result to float rounding (teachers.edm_layers.winograd_convs).
    winograd: bool = False
    # CPU tensors of at least this many MiB get their own memory mapping, returned to the system when freed, instead
    # of coming from glibc's heap, which fragments: a lower peak RSS for page faults (refiner.heap). None = glibc's
    # default.
    mmap_threshold: float | None = None
    # On a GPU, cuDNN times its convolution algorithms once for each of the loop's fixed shapes and keeps the
    # fastest (torch.backends.cudnn.benchmark, the official loop's setting): the same results to float rounding.
    cudnn_benchmark: bool = True
    seed: int = 0
    lr: float = 1e-5  # generator learning rate
    fake_lr: float = 1e-5  # fake-score network learning rate
    betas: tuple[float, float] = (0.0, 0.999)
    ratio: int = 1  # fake-score updates per generator update
    ema: float = 500.0  # EMA half-life in kimg (0 disables the ramp-up and EMA: ema = generator)
    ema_rampup: float | None = 0.05
    loss: str = "ikl"
    loss_options: dict[str, Any] = field(default_factory=dict)  # the loss's own options (refiner.losses)
    # A job's defaults for loss options, over the chosen loss's own where it takes them (`resolve_config`).
    loss_option_defaults: dict[str, Any] = field(default_factory=dict)
    sigma: str = "lognormal"  # σ of the generator step (refiner.sigma.SIGMA_SAMPLERS)
    fake_sigma: str = SAME  # σ of the fake-score step: "same" as the generator step, or a sampler name
    # Options of the samplers (None: the sampler's default; an option neither sampler reads must be None).
    p_mean: float | None = None
    p_std: float | None = None
    levels: int | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    min_percent: float | None = None
    max_percent: float | None = None
    t_max: float | None = None
    loss_scale: float = 1.0  # generator loss multiplier (official --ls)
    fake_loss_scale: float = 1.0  # fake loss multiplier (official --sgls)
    grad_clip: float | None = None  # clip each network's gradient norm (DMD2 uses 10)
    fake_warmup: int = 0  # fake-score steps before the first generator step
    precision: str = "auto"  # one of PRECISIONS; config.json records what auto became (for_device)
    teacher_mode: str = "eval"  # one of TEACHER_MODES
    augment: float = 0.0  # EDM AugmentPipe probability on the fake-score step (official: 0.12); 0 = off
    reuse_images: bool = False  # the fake step after a generator step trains on its images (DMD2), not new ones
    # One fake-network pass serves both updates: the fake score's denoising step trains on the generator step's
    # x_t (its images, σ and ε), the generator step reads D_f from that same pass (refiner.loop, `reuse_pass`).
    reuse_pass: bool = False
    compile: bool = False  # torch.compile the three networks (eager where compiling fails)
    snapshot_every: int = 0  # generator updates between checkpoints (0 = only at the end)
    log_every: int = 10
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # job-specific options, recorded in config.json
    sources: dict[str, str] = field(default_factory=dict)  # where each value came from (command-line runs)

    # Fields that may change between a run and its resume (they do not change the trajectory).
    # recompute_norms and mmap_threshold change nothing computed, winograd and cudnn_benchmark only the float
    # rounding of convolutions; batch_gpu changes only the float rounding of the sums, and what is computed per
    # chunk: batch statistics (BatchNorm, uni's self-normalised weights, SiDA's batch-mean products) and the
    # networks' own random draws.
    RESUMABLE_CHANGES = ("steps", "snapshot_every", "log_every", "device", "sources", "loss_option_defaults",
                         "compile", "batch_gpu", "recompute_norms", "winograd", "mmap_threshold", "cudnn_benchmark")

    def samplers(self) -> dict[str, str]:
        """The sampler of each step: {"generator": name, "fake": name}."""
        return {"generator": self.sigma, "fake": self.sigma if self.fake_sigma == SAME else self.fake_sigma}

    def sampler_options(self) -> dict[str, Any]:
        """The sampler options that are set (not None)."""
        return {k: getattr(self, k) for k in ALL_SAMPLER_OPTIONS if getattr(self, k) is not None}

    def validate(self) -> TrainConfig:
        numbers = {"--lr": self.lr, "--fake-lr": self.fake_lr, "--ema": self.ema, "--p-mean": self.p_mean,
                   "--p-std": self.p_std, "loss_scale": self.loss_scale, "fake_loss_scale": self.fake_loss_scale}
        checks = [
            *((math.isfinite(v), f"{k} must be a finite number (got {v})") for k, v in numbers.items()
              if v is not None),  # None: an option of a σ sampler this run does not use
            (self.steps >= 0, f"--steps must be >= 0 (got {self.steps})"),
            (self.batch >= 1, f"--batch must be >= 1 (got {self.batch})"),
            (self.batch_gpu is None or self.batch_gpu >= 1, f"--batch-gpu must be >= 1 (got {self.batch_gpu})"),
            (0 < self.lr <= 1, f"--lr must be in (0, 1] (got {self.lr}): Adam moves each weight by about lr per step"),
            (0 < self.fake_lr <= 1, f"--fake-lr must be in (0, 1] (got {self.fake_lr}): Adam moves each weight by "
                                    "about lr per step"),
            (self.ratio >= 1, f"--ratio must be >= 1 fake update per generator update (got {self.ratio})"),
            (self.ema >= 0, f"--ema (half-life in kimg) must be >= 0 (got {self.ema})"),
            (all(0 <= b < 1 for b in self.betas), f"Adam betas must lie in [0, 1) (got {self.betas})"),
            (self.snapshot_every >= 0, f"--snapshot-every must be >= 0 (got {self.snapshot_every})"),
            (self.log_every >= 1, f"--log-every must be >= 1 (got {self.log_every})"),
            (self.fake_warmup >= 0, f"--fake-warmup must be >= 0 (got {self.fake_warmup})"),
            (self.loss in GENERATOR_LOSSES, f"--loss must be one of {sorted(GENERATOR_LOSSES)}"),
            (self.sigma in SIGMA_SAMPLERS, f"--sigma must be one of {sorted(SIGMA_SAMPLERS)}"),
            (self.fake_sigma == SAME or self.fake_sigma in SIGMA_SAMPLERS,
             f"--fake-sigma must be {SAME} or one of {sorted(SIGMA_SAMPLERS)}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda (got {self.device!r})"),
            (self.grad_clip is None or self.grad_clip > 0, "--grad-clip must be > 0"),
            (self.teacher_mode in TEACHER_MODES, f"--teacher-mode must be one of {', '.join(TEACHER_MODES)} "
                                                 f"(got {self.teacher_mode!r})"),
            (0 <= self.augment <= 1, f"--augment is a probability in [0, 1] (got {self.augment})"),
            (self.mmap_threshold is None or 0 < self.mmap_threshold <= heap.MAX_MMAP_THRESHOLD_MIB,
             f"--mmap-threshold is in MiB, in (0, {heap.MAX_MMAP_THRESHOLD_MIB}] (got {self.mmap_threshold})"),
            (self.mmap_threshold is None or heap.glibc_available(), heap.NOT_GLIBC),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self._validate_loss_and_sigma()
        self._validate_reuse_pass()
        return self

    def _validate_reuse_pass(self) -> None:
        """What --reuse-pass needs: the fake step's σ, images and inputs must be the generator step's."""
        if not self.reuse_pass:
            return
        samplers = self.samplers()
        checks = [
            (samplers["generator"] == samplers["fake"],
             f"--reuse-pass trains the fake score at the generator step's σ, so both steps must draw σ alike; "
             f"this run draws the generator's from {samplers['generator']} and the fake score's from "
             f"{samplers['fake']} (loss {self.loss}'s default): add --fake-sigma same, or drop --reuse-pass"),
            (not self.reuse_images, "--reuse-pass already trains the fake score on the generator step's images: "
                                    "drop --reuse-images"),
            (self.augment == 0, "--reuse-pass shares the fake network's pass with the generator step, which is "
                                "not augmented: use --augment 0, or drop --reuse-pass"),
            (not get_loss(self.loss).uses_discriminator(self.loss_options),
             f"--reuse-pass does not apply to loss {self.loss}: its fake step also trains a discriminator on real "
             f"images; drop --reuse-pass"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def _validate_loss_and_sigma(self) -> None:
        try:
            get_loss(self.loss).resolve(self.loss_options)
            used = {o for s in self.samplers().values() for o in sampler_options(s)}
            for name in set(self.samplers().values()):
                check_sampler(name, {k: v for k, v in self.sampler_options().items() if k in sampler_options(name)})
        except ValueError as e:
            raise UserError(str(e)) from None
        unused = sorted(set(self.sampler_options()) - used)
        if unused:
            raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in unused)} not read by "
                            f"--sigma {self.sigma} / --fake-sigma {self.fake_sigma}")

    def for_device(self, device: torch.device) -> TrainConfig:
        """This configuration as it runs on `device`: precision auto replaced by `resolve_precision`'s choice,
        its source marked "(auto on DEVICE)"; any other precision is kept as given."""
        if self.precision != "auto":
            return self
        source = f"{self.sources.get('precision', 'default')} (auto on {device.type})"
        return dataclasses.replace(self, precision=resolve_precision(self.precision, device),
                                   sources={**self.sources, "precision": source})

    def local_chunks(self, processes: int) -> list[slice]:
        """The rows of each chunk of one process's share of the batch (--batch-gpu), with `processes` processes;
        a UserError where the batch does not split evenly."""
        if self.batch % processes:
            raise UserError(f"--batch {self.batch} must be divisible by the number of processes ({processes})")
        local = self.batch // processes
        chunk = min(self.batch_gpu or local, local)
        if local % chunk:
            raise UserError(f"--batch-gpu {self.batch_gpu} must divide the batch of each process, {local} (--batch "
                            f"{self.batch} over {processes} process(es)): choose a divisor of {local}")
        return [slice(i, i + chunk) for i in range(0, local, chunk)]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)

    def differences(self, other: TrainConfig, checked: tuple[str, ...] = ()) -> list[str]:
        """Fields that differ and would change the trajectory (those a resume must keep), `extra` key by key. The
        inputs (INPUT_OPTIONS) differ only where they name different things (`same_input`); `checked` names the
        inputs whose contents the caller compared itself (the teacher, by its sha256)."""
        a, b = self.to_json(), other.to_json()
        diffs = [f"{k} (checkpoint {a[k]!r}, now {b[k]!r})" for k in a
                 if k not in (*self.RESUMABLE_CHANGES, "extra") and a[k] != b[k]]
        ea, eb = a["extra"], b["extra"]
        for k in [*ea, *(k for k in eb if k not in ea)]:
            va, vb = ea.get(k), eb.get(k)
            same = (k in checked or same_input(va, vb)) if k in INPUT_OPTIONS else va == vb
            if not same:
                diffs.append(f"{k} (checkpoint {va!r}, now {vb!r})")
        return diffs


# The job options that name input files or folders (TrainConfig.extra keys), recorded as absolute paths (URLs as
# given): a resume from another working directory names them otherwise and means the same files.
INPUT_OPTIONS = ("teacher", "generator", "init", "data")


def input_name(src: str | None) -> str | None:
    """How a run records an input: a local path made absolute, a URL (or None) as given."""
    return src if src is None or is_url(src) else os.path.abspath(src)


def same_input(a: Any, b: Any) -> bool:
    """Whether two recorded names of an input mean the same one: the same text, or the same file or folder on
    this machine (relative names from the working directory, through links)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or is_url(a) or is_url(b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (here)
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses on `device`. auto: bf16 autocast on a CUDA device with native bf16 (compute
    capability 8 or newer, NVIDIA Ampere on, or ROCm: what torch.cuda.is_bf16_supported(including_emulation=False)
    says, asked of this device), where the U-Nets' matrix products run on the tensor cores at fp32's range (no
    loss scaling); fp32 on CPUs and older GPUs (which only emulate bf16, slowly; fp16 there would need loss
    scaling tuned per loss). Any other value is returned as given (on a CPU the loop runs fp32)."""
    if precision != "auto":
        return precision
    native_bf16 = device.type == "cuda" and (torch.version.hip is not None
                                              or torch.cuda.get_device_capability(device)[0] >= 8)
    return "bf16" if native_bf16 else "fp32"


# Loss options for runs that start from a trained generator or last a few kimg (refinement, the demo): SiDA's
# adversarial term from the first generator step. SiDA delays it by 100 kimg (--gan-start-kimg) because its
# one-step generator starts as a copy of the teacher; a refined GAN needs no delay, and a run of 64 kimg
# (`refiner refine`'s default) or of 2.4-9.6 kimg (the demo) would otherwise never use the term at all.
# The presets keep SiDA's 100.
SHORT_RUN_LOSS_OPTIONS: dict[str, Any] = {"gan_start_kimg": 0.0}

# `refiner refine`'s (and `refiner.train`'s) defaults: a short fine-tuning of a trained GAN.
REFINE_DEFAULTS = TrainConfig(steps=1000, batch=64, lr=1e-5, fake_lr=1e-5, ema=10.0, snapshot_every=250,
                              log_every=10, loss_option_defaults=SHORT_RUN_LOSS_OPTIONS)

# The options of a training run by name (the CLI's, with underscores; refiner.train takes the same).
TRAINING_KEYS = ("steps", "batch", "batch_gpu", "seed", "device", "lr", "fake_lr", "ratio", "ema", "snapshot_every",
                 "loss", "sigma", "fake_sigma", "fake_warmup", "precision", "log_every", "beta1", "beta2",
                 "teacher_mode", "augment", "reuse_images", "reuse_pass", "compile", "recompute_norms",
                 "winograd", "mmap_threshold", "cudnn_benchmark",
                 *ALL_SAMPLER_OPTIONS, *loss_option_users())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_config(base: TrainConfig, given: dict[str, Any], preset_values: dict[str, Any] | None = None,
                   **extra: Any) -> TrainConfig:
    """The run's TrainConfig: the job's defaults (`base`) → the preset's values → the loss's defaults (its
    options: then the job's `loss_option_defaults` that it takes) → the options the user gave (`given`, None =
    not given; beta1/beta2 and the loss options by name). An
    option that the chosen loss or σ samplers do not read is refused when the user gave it, and dropped
    when it came from a default. `sources` records where every value came from."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("extra", "sources")]
    values = {k: getattr(base, k) for k in names}
    sources = {k: "default" for k in names}
    for k, v in (preset_values or {}).items():
        values[k], sources[k] = v, "preset"
    loss = given.get("loss") or values["loss"]
    try:
        spec = get_loss(loss)
    except ValueError as e:
        raise UserError(f"--loss: {e}") from None
    values["loss"], sources["loss"] = loss, "user" if given.get("loss") else sources["loss"]
    for k, v in spec.defaults.items():
        values[k], sources[k] = v, f"loss {loss}"
    loss_options = dict(spec.options)
    sources.update({f"loss_options.{k}": f"loss {loss}" for k in spec.options})
    for k, v in base.loss_option_defaults.items():
        if k in spec.options:
            loss_options[k], sources[f"loss_options.{k}"] = v, "default"
    users = loss_option_users()
    betas = list(values["betas"])
    for k, v in given.items():
        if v is None or k == "loss":
            continue
        if k in users:
            if k not in spec.options:
                raise UserError(f"{_flag(k)} is an option of loss {' / '.join(users[k])}, and this run uses "
                                f"--loss {loss}; drop {_flag(k)} or choose --loss {users[k][0]}")
            loss_options[k], sources[f"loss_options.{k}"] = v, "user"
        elif k in ("beta1", "beta2"):
            betas[k == "beta2"] = v
            sources["betas"] = "user"
        else:
            values[k], sources[k] = v, "user"
    values["betas"], values["loss_options"] = tuple(betas), loss_options
    _resolve_sampler_options(values, sources)
    config = TrainConfig(**values, extra={**base.extra, **extra}, sources=sources)
    return config.validate()


def _resolve_sampler_options(values: dict[str, Any], sources: dict[str, str]) -> None:
    for key in ("sigma", "fake_sigma"):
        allowed = list(SIGMA_SAMPLERS) + ([SAME] if key == "fake_sigma" else [])
        if values[key] not in allowed:
            raise UserError(f"{_flag(key)} must be one of {', '.join(allowed)} (got {values[key]!r})")
    chosen = dict.fromkeys([values["sigma"], values["sigma"] if values["fake_sigma"] == SAME else values["fake_sigma"]])
    for option in ALL_SAMPLER_OPTIONS:
        readers = [name for name in chosen if option in sampler_options(name)]
        if not readers:
            if sources.get(option) == "user":
                which = [name for name in SIGMA_SAMPLERS if option in sampler_options(name)]
                raise UserError(f"{_flag(option)} applies to --sigma / --fake-sigma {' or '.join(which)}; this "
                                f"run draws σ with --sigma {values['sigma']} and --fake-sigma "
                                f"{values['fake_sigma']}: drop {_flag(option)} or choose the sampler it belongs to")
            values[option] = None
            sources.pop(option, None)
        elif values[option] is None:
            values[option] = next(f.default for f in dataclasses.fields(SIGMA_SAMPLERS[readers[0]])
                                  if f.name == option)
            sources[option] = f"sampler {readers[0]}"
