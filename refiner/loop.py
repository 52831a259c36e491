"""The Diff-Instruct training loop (docs/design.md §4; Luo et al. 2023, Algorithm 1).

One iteration = `ratio` fake-score steps, then one generator step:
1. fake step:  x = sg[G(z, c)] (optionally augmented by EDM's AugmentPipe, the fake told how), σ ~ p(σ),
   x_t = x + σε;  L(φ) = λ(σ)‖D_φ(x_t, σ, c) − x‖²;
2. generator step:  x = G(z', c'), x_t = x + σ'ε';  D_r = teacher(x_t), D_f = fake(x_t) without gradients;
   L(θ) = ⟨sg[D_f − D_r], x⟩ / N  (or another loss of refiner.losses); both networks in eval mode, or in
   train mode with shared dropout masks as the official code (`teacher_mode`).
With `reuse_pass` the last fake step of an iteration is done on the generator step's pass instead: its
x_t = x + σ'ε' (x detached as the target) and its D_φ(x_t) with gradients, which the generator loss reads too
(7 network passes per iteration for ikl instead of 9; the fake score then trains in the generator step's
network mode and at its σ).
With `batch_gpu` each process runs its share of the batch in chunks of that many rows: every chunk's loss,
weighted by its share of the rows, is backpropagated at once and the gradients sum before one optimiser step
(EDM's --batch-gpu: the same update in less memory).
The adversarial losses (dmd2, sida) add a discriminator on the fake network's bottleneck (refiner.adversarial):
its loss on real images (`real_data`) and generated ones joins the fake step's loss, its generator term the
generator step's; its head trains with the fake network's optimiser and is part of the checkpoints.

The loop only sees the `Generator` and `Denoiser` interfaces. It owns mixed precision, gradient hygiene
(a non-finite gradient never reaches the weights: the step is skipped and counted), the EMA, atomic
checkpoints of the whole training state, the JSON-lines log, the progress bar and data parallelism.

Randomness: every draw of the loop (latents, labels, σ, ε) comes from one CPU `torch.Generator` seeded
with `config.seed`, and every process draws the *global* batch and keeps its own slice. So N processes
follow exactly the trajectory of one process with the same global batch, and a checkpoint resumes
under any process count. What the networks draw themselves from torch's global generators (StyleGAN2's
per-pixel noise, dropout, augmentation) starts from a seed derived from `config.seed` and the rank; both
states are in every checkpoint, and snapshot callbacks run on a forked global state, so grids and
metrics never move the training's randomness: a run is reproducible bit for bit on CPU, and a resumed
run equals the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import torch
from torch import nn

from common.errors import UserError
from fileformats.progress import Progress
from gan_adapters.base import derived_seed
from refiner import distributed as dist
from refiner import heap
from refiner.adversarial import Adversary, gan_options
from refiner.augment import AugmentPipe
from refiner.config import INPUT_OPTIONS, TrainConfig
from refiner.ema import ema_beta, update_ema
from refiner.losses import add_noise, denoising_loss, generator_objective, get_loss
from refiner.optim import make_adam
from refiner.realdata import RealData, require_data
from refiner.rundir import RunDir
from refiner.sigma import make_sampler
from teachers.edm_layers import recompute_norms, winograd_convs


def make_sigma_sampler(config: TrainConfig, step: str = "generator"):
    """The σ sampler of the generator step or the fake-score step, from the registry with the config's
    options (refiner.sigma)."""
    return make_sampler(config.samplers()[step], config.sampler_options())


def _takes_augment_labels(network: nn.Module) -> bool:
    """Whether `network(x, σ, c, augment_labels=...)` is accepted (EDM's networks take it)."""
    parameters = inspect.signature(network.forward).parameters.values()
    return any(p.name == "augment_labels" or p.kind is p.VAR_KEYWORD for p in parameters)


def _dropout_rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that dropout on `device` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_dropout_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _SharedDropout(nn.Module):
    """`network` called with the dropout masks of another call: the first network of a pair records the state
    of the RNG dropout draws from before it runs (`record`), the second restores it first, so both draw the
    same masks (the official Diff-Instruct generator step)."""

    def __init__(self, network: Callable, device: torch.device, memory: dict[str, torch.Tensor], record: bool):
        super().__init__()
        self.network, self.device, self.memory, self.record = network, device, memory, record

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.record:
            self.memory["state"] = _dropout_rng_state(self.device)
        else:
            _set_dropout_rng_state(self.device, self.memory["state"])
        return self.network(x, sigma, labels)


class _KeptPass:
    """--reuse-pass: the fake network as the generator loss calls it, but with autograd on (whatever the
    caller's context) and its weights trainable (not an nn.Module, so `losses.frozen` leaves them), its output
    kept for the fake step's denoising loss on the same pass."""

    def __init__(self, network: Callable):
        self.network, self.output = network, None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.enable_grad():
            self.output = self.network(x, sigma, labels)
        return self.output


def _set_mode(module: nn.Module, training: bool) -> None:
    """`module.train(training)` unless its root is in that mode already: the Trainer sets its networks' modes whole,
    so the root's flag is every submodule's, and nn.Module.train walks them all (4.6 ms a call for the CIFAR-10
    DDPM++ on a 2-core CPU, up to six calls an iteration)."""
    if module.training != training:
        module.train(training)


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """`t[rows]`, or None for None (no labels)."""
    return None if t is None else t[rows]


def _add_weighted(total: dict[str, float], part: dict[str, float], weight: float) -> None:
    """total += weight · part, key by key: a chunk's statistics into the batch's (--batch-gpu)."""
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + weight * v


def _has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH (TorchInductor builds its CPU kernels with one)."""
    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


class _Compiled:
    """`module` called through torch.compile, or eagerly where compiling fails: on the first failure (no C++
    compiler for TorchInductor's CPU kernels, an unsupported operation) it warns once and runs `module`
    itself from then on. Both run the same module on the same parameters."""

    def __init__(self, module: Callable, warn: Callable[[str], None]):
        self.module, self.warn = module, warn
        self.compiled: Callable | None = torch.compile(module)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the compiler falls back to eager
                self.compiled = None
                self.warn(f"warning: --compile: torch.compile failed for {type(self.module).__name__} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); running it eagerly")
        return self.module(*args, **kwargs)


def _compile_networks(networks: dict[str, Callable], device: torch.device, echo: Callable[[str], None]
                      ) -> dict[str, _Compiled]:
    """--compile: each nn.Module of `networks` through `_Compiled` (one warning at most for all of them);
    none without a C++ compiler on a CPU run (a warning; the loop stays eager). The modules, their parameters
    and modes are the same either way; dropout in compiled code draws from torch's generator as eager does
    (TorchInductor's fallback_random), so the trajectory is the eager one."""
    if device.type == "cpu" and not _has_cxx_compiler():
        echo("warning: --compile needs a C++ compiler on CPU (none on PATH: set CXX or install g++); running eagerly")
        return {}
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    warned: list[str] = []

    def warn_once(message: str) -> None:
        if not warned:
            warned.append(message)
            echo(message)

    return {name: _Compiled(module, warn_once) for name, module in networks.items() if isinstance(module, nn.Module)}


@dataclass
class Counters:
    step: int = 0  # generator updates done
    fake_steps: int = 0  # fake-score updates done
    nimg: int = 0  # generator images seen by generator steps
    skipped_generator: int = 0  # generator steps skipped for a non-finite gradient
    skipped_fake: int = 0


@dataclass
class _Window:
    """Running sums between two log records."""

    values: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    images: int = 0

    def add(self, **kw: float) -> None:
        for k, v in kw.items():
            if v == v:  # skip NaN in averages
                self.values[k] = self.values.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.values[k] / self.counts[k] for k in self.values}


STATE_FORMAT = "refiner-training-state/2"  # /2: one fp16 loss scaler per loss ("scalers")

# Consecutive generator steps with a non-finite gradient that stop a run; with fp16 loss scaling 32 more, the
# steps its scale may need to back off from 2^16 after overflows.
MAX_NONFINITE_STEPS = 10


class Trainer:
    """Runs the loop for a generator, a frozen teacher and a trainable fake-score network.

    `generator` and `fake` are nn.Modules on `device`; `teacher` is any Denoiser. `on_snapshot` callbacks
    run on rank 0 after every checkpoint (and at the end) with the trainer as argument.
    """

    def __init__(self, config: TrainConfig, generator: nn.Module, teacher: Callable, fake: nn.Module,
                 run: RunDir, device: torch.device, on_snapshot: tuple[Callable[[Trainer], None], ...] = (),
                 echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr), real_data: RealData | None = None):
        self.config = config = config.for_device(device).validate()
        self.world, self.rank = dist.world_size(), dist.rank()
        self.chunks = config.local_chunks(self.world)  # --batch-gpu: each process's batch in chunks
        if config.mmap_threshold is not None:  # before the EMA copy and Adam's state are allocated (refiner.heap)
            heap.set_mmap_threshold(config.mmap_threshold)
        # The generator trains in train mode, as the official loop sets it (StyleGAN2's mapping tracks w_avg, a
        # one-step generator's dropout is on), whatever mode it came in: with --reuse-pass no fake step samples it
        # in eval mode and restores train mode, so without this a resumed run would train in the loader's mode.
        # The teacher rests in eval mode, the fake score in train mode; set whole here, so that the loop's
        # `_set_mode` may read a network's mode from its root.
        self.generator, self.fake = generator.train(), fake.train()
        self.teacher = teacher.eval() if isinstance(teacher, nn.Module) else teacher
        self.run, self.device, self.on_snapshot = run, device, on_snapshot
        self.echo = echo if self.rank == 0 else (lambda s: None)
        self.ema = copy.deepcopy(generator).requires_grad_(False).eval()
        # Adversarial losses: a discriminator head on the fake network's bottleneck, trained with it.
        require_data(config.loss, real_data, config.loss_options)
        self.real_data = real_data
        options = gan_options(config.loss, config.loss_options)
        self.adversary = None if options is None else Adversary(options, fake, config.seed)
        self.fake_params = [p for m in (fake, self.adversary) if m is not None for p in m.parameters()
                            if p.requires_grad]
        self.opt_g = make_adam([p for p in generator.parameters() if p.requires_grad], config.lr, config.betas)
        self.opt_f = make_adam(self.fake_params, config.fake_lr, config.betas)
        self.reused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # --reuse-images: G's last batch
        # --compile; with shared dropout masks the teacher and the fake score stay eager (their masks come from
        # restoring the RNG state between the two calls).
        shared = config.teacher_mode == "train-shared-dropout"
        compiled = {"generator": generator, **({} if shared else {"teacher": teacher, "fake": fake})}
        self.compiled = _compile_networks(compiled, device, self.echo) if config.compile else {}
        # each optimiser's gradients averaged over processes while its backward runs (refiner.distributed)
        self.reducers = {opt: dist.GradientReducer([p for group in opt.param_groups for p in group["params"]])
                         for opt in (self.opt_g, self.opt_f)}
        self.rng = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(derived_seed(config.seed, f"global/{self.rank}"))  # CPU and every CUDA device
        self.teacher_id = getattr(teacher, "identity", None)  # recorded in checkpoints, checked on resume
        self.sigma_sampler = make_sigma_sampler(config)
        self.fake_sigma_sampler = make_sigma_sampler(config, "fake")
        self.loss_spec = get_loss(config.loss)
        self.augment = AugmentPipe(p=config.augment) if config.augment > 0 else None
        if self.augment is not None and not _takes_augment_labels(fake):
            raise UserError("--augment needs a fake-score network that takes augmentation labels (an EDM U-Net); "
                            "this one does not: use --augment 0")
        self.sigma_data = float(getattr(teacher, "sigma_data", 0.5))
        if device.type == "cuda":  # process-wide, as the official loop sets it
            torch.backends.cudnn.benchmark = config.cudnn_benchmark
        if config.winograd and (device.type != "cpu" or not torch.backends.nnpack.is_available()):
            self.echo("note: --winograd changes nothing here: it runs CPU convolutions by NNPACK, which "
                      + ("this CPU or torch build lacks (it needs AVX2)" if device.type == "cpu" else
                         f"does not apply on {device.type}"))
        self.counters = Counters()
        self.window = _Window()  # the statistics since the last log record (kept in checkpoints)
        # fp16 loss scaling, one scaler per loss, as the two differ in scale by orders of magnitude. The
        # denoising loss's weight λ(σ) ~ 1/σ² makes its gradients large at small σ: scaled by PyTorch's
        # default 2^16 (even by 2^11) they overflow fp16, so its scale starts at 1 and grows (x2 after
        # every 2000 finite steps); the generator loss ⟨D_f − D_r, x⟩ has small gradients and starts at 2^16.
        fp16 = config.precision == "fp16" and device.type == "cuda"
        self.scalers = {"fake": torch.amp.GradScaler("cuda", init_scale=1.0, enabled=fp16),
                        "generator": torch.amp.GradScaler("cuda", init_scale=2.0**16, enabled=fp16)}
        self.peak_rss = 0
        self.nonfinite_steps = 0  # consecutive generator steps skipped for a non-finite gradient
        options = {k: v for k, v in config.to_json().items() if k not in ("device", "sources")}
        options["extra"] = {k: v for k, v in options["extra"].items() if k not in INPUT_OPTIONS}  # compared by content
        dist.check_same({"teacher": dist.fingerprint(teacher), "generator architecture": dist.fingerprint(generator),
                         "options": json.dumps(options, sort_keys=True, default=str)})
        dist.broadcast_module(generator)
        dist.broadcast_module(fake)
        dist.broadcast_module(self.ema)
        if self.adversary is not None:
            dist.broadcast_module(self.adversary)

    def _call(self, name: str) -> Callable:
        """How the loop calls network `name` (generator, teacher, fake): compiled with --compile, else itself."""
        return self.compiled.get(name) or getattr(self, name)

    # -- randomness: global draws, local slices --------------------------------------------------------
    def _local(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n].to(self.device)

    def _draw(self, sigma_sampler: Callable, latents: bool = True
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Latents, labels, σ and ε for one global batch (drawn on every rank, sliced per rank); without
        `latents` only σ and ε are drawn (z and c are None)."""
        b = self.config.batch
        z = self.generator.sample_latents(b, self.rng) if latents else None
        c = self.generator.sample_labels(b, self.rng) if latents else None
        sigma = sigma_sampler(b, self.rng)
        noise = torch.randn((b, *self.generator.data_shape), generator=self.rng)
        return self._local(z), self._local(c), self._local(sigma), self._local(noise)

    def _draw_adversarial(self, passes: int) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """The discriminator's draws for `passes` head passes, and (for the fake step, passes = 2) real data."""
        b = self.config.batch
        draws = [self._local(t) for t in self.adversary.draws(b, self.generator.data_shape, self.rng, passes)]
        if passes < 2:
            return draws, None, None
        n = b // self.world
        real, labels = self.real_data.draw(b, self.rng, slice(self.rank * n, (self.rank + 1) * n))
        return draws, real.to(self.device), None if labels is None else labels.to(self.device)

    def _autocast(self):
        if self.device.type != "cuda" or self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    # -- gradients accumulated over the chunks of the batch, one optimiser step with gradient hygiene -------
    @contextlib.contextmanager
    def _passes(self) -> Iterator[None]:
        """The EDM layers' options for a step's network passes: --recompute-norms (it acts where gradients are
        recorded) and --winograd (teachers.edm_layers)."""
        with recompute_norms(self.config.recompute_norms), winograd_convs(self.config.winograd):
            yield

    def _parts(self) -> Iterator[tuple[slice, float, bool]]:
        """(rows, weight, last) for each chunk of the local batch (--batch-gpu; one chunk without it). A loss
        that is a mean over its chunk's rows times the weight n_chunk / n_local sums over the chunks to the
        mean over the local batch."""
        n_local = self.chunks[-1].stop
        for i, rows in enumerate(self.chunks):
            yield rows, (rows.stop - rows.start) / n_local, i == len(self.chunks) - 1

    def _backward(self, loss: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                  scale: float, scaler: torch.amp.GradScaler, last: bool, retain_graph: bool = False) -> None:
        """Accumulate the gradient of `loss` into `params` only; the last chunk's backward also averages the
        accumulated gradients over processes. `retain_graph` keeps the graph for a second loss on the same pass
        (--reuse-pass)."""
        with self.reducers[opt] if last else contextlib.nullcontext():
            scaler.scale(loss * scale).backward(inputs=params, retain_graph=retain_graph)

    def _step(self, params: list[nn.Parameter], opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler
              ) -> tuple[float, bool]:
        """Check, clip and apply the accumulated gradients, then clear them. Returns (grad norm, applied)."""
        grads = [p.grad for p in params if p.grad is not None]
        scaler.unscale_(opt)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        finite = bool(torch.isfinite(norm))
        if finite:
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.config.grad_clip, norm)
            scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        scaler.update()
        return float(norm), finite

    def fake_step(self) -> dict[str, float]:
        """One fake-score update on a fresh generator batch, or with --reuse-images on the previous generator
        step's images (detached, drawn in train mode) the first time after it (DMD2, tianweiy/DMD2
        main/edm/train_edm.py: the guidance update trains on the generator turn's images)."""
        reused, self.reused = self.reused, None
        z, c, sigma, noise = self._draw(self.fake_sigma_sampler, latents=reused is None)
        if self.adversary is not None:
            draws, real, c_real = self._draw_adversarial(2)
        if reused is not None:
            images, c = reused
        augment_params = None
        if self.augment is not None:
            augment_params = {k: self._local(v) for k, v in self.augment.sample(self.config.batch, self.rng).items()}
        self.opt_f.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        with self._passes():
            for rows, weight, last in self._parts():
                if reused is not None:
                    x = images[rows]
                else:
                    with torch.no_grad(), self._autocast():
                        _set_mode(self.generator, False)
                        x = self._call("generator")(z[rows], _rows(c, rows)).float()
                        _set_mode(self.generator, True)
                augment: dict[str, torch.Tensor] = {}
                if augment_params is not None:  # EDM's AugmentPipe; the network is told what was done (augment_labels)
                    x, augment["augment_labels"] = self.augment(x, {k: v[rows] for k, v in augment_params.items()})
                _set_mode(self.fake, True)
                with self._autocast():
                    denoised = self._call("fake")(add_noise(x, sigma[rows], noise[rows]), sigma[rows], _rows(c, rows),
                                                  **augment).float()
                loss = denoising_loss(denoised, x, sigma[rows], self.sigma_data)
                part = {"loss_fake": float(loss.detach())}
                if self.adversary is not None:
                    with self._autocast():
                        loss_disc, disc_stats = self.adversary.discriminator_loss(
                            self.fake, x, _rows(c, rows), real[rows], _rows(c_real, rows), sigma[rows], noise[rows],
                            [d[rows] for d in draws], self.sigma_data)
                    loss = loss + loss_disc
                    part.update(disc_stats)
                self._backward(loss * weight, self.fake_params, self.opt_f, self.config.fake_loss_scale,
                               self.scalers["fake"], last)
                _add_weighted(stats, part, weight)
        return self._fake_update(stats)

    def _fake_update(self, stats: dict[str, float]) -> dict[str, float]:
        """Apply the fake step's accumulated gradient (of the denoising loss, with the discriminator's where there
        is one)."""
        norm, ok = self._step(self.fake_params, self.opt_f, self.scalers["fake"])
        self.counters.fake_steps += 1
        self.counters.skipped_fake += not ok
        return {**stats, "grad_norm_fake": norm}

    def generator_step(self) -> dict[str, float]:
        """One generator update; with --reuse-pass also the fake step, on the fake network's pass of this step."""
        z, c, sigma, noise = self._draw(self.sigma_sampler)
        if self.adversary is not None:
            draws = self._draw_adversarial(1)[0]
        params = self.opt_g.param_groups[0]["params"]
        self.opt_g.zero_grad(set_to_none=True)
        if self.config.reuse_pass:
            self.opt_f.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        images = []
        with self._passes():
            for rows, weight, last in self._parts():
                c_rows = _rows(c, rows)
                with self._autocast(), self._networks() as (teacher, fake):
                    kept = _KeptPass(fake) if self.config.reuse_pass else None
                    x = self._call("generator")(z[rows], c_rows).float()
                    parts: dict[str, torch.Tensor] = {}
                    loss = generator_objective(self.loss_spec, x, sigma[rows], noise[rows], teacher, kept or fake,
                                               c_rows, parts=parts,
                                               discriminator=getattr(self.adversary, "log_ratio", None),
                                               **self.config.loss_options)
                if self.adversary is not None:
                    with self._autocast():
                        loss, gan_stats = self.adversary.generator_loss(
                            self.fake, loss, x, c_rows, [d[rows] for d in draws], parts["d_real"],
                            self.counters.nimg / 1000)
                    _add_weighted(stats, gan_stats, weight)
                if self.config.reuse_images:
                    images.append(x.detach())
                self._backward(loss * weight, params, self.opt_g, self.config.loss_scale, self.scalers["generator"],
                               last, retain_graph=kept is not None and self.loss_spec.input_grad)  # D_f's graph
                _add_weighted(stats, {"loss_gen": float(loss.detach())}, weight)
                if kept is not None:  # L(φ) = λ(σ)‖D_φ(x_t) − sg[x]‖² on the pass the generator loss read D_f from
                    loss_fake = denoising_loss(kept.output.float(), x.detach(), sigma[rows], self.sigma_data)
                    self._backward(loss_fake * weight, self.fake_params, self.opt_f, self.config.fake_loss_scale,
                                   self.scalers["fake"], last)
                    _add_weighted(stats, {"loss_fake": float(loss_fake.detach())}, weight)
        if self.config.reuse_images:
            self.reused = (torch.cat(images), c)
        norm, ok = self._step(params, self.opt_g, self.scalers["generator"])
        fake_stats = self._fake_update({}) if self.config.reuse_pass else {}
        if not ok:
            self.counters.skipped_generator += 1
            self.echo(f"warning: step {self.counters.step + 1}: non-finite generator gradient; the update "
                      f"was skipped ({self.counters.skipped_generator} skipped so far)")
        self._stop_if_diverged(ok, stats["loss_gen"])
        c_cfg = self.config
        if c_cfg.ema > 0:
            beta = ema_beta(c_cfg.batch, self.counters.nimg, c_cfg.ema, c_cfg.ema_rampup)
            update_ema(self.ema, self.generator, beta)
        else:
            update_ema(self.ema, self.generator, 0.0)
        self.counters.nimg += self.config.batch  # after the EMA: its β uses the count before this batch (EDM)
        self.counters.step += 1
        return {**stats, "grad_norm_gen": norm, **fake_stats,
                "sigma_mean": float(sigma.mean()), "sigma_min": float(sigma.min()), "sigma_max": float(sigma.max())}

    def _stop_if_diverged(self, applied: bool, loss: float) -> None:
        """A UserError after MAX_NONFINITE_STEPS skipped generator steps in a row: the weights or the loss
        diverged (e.g. --lr too large), and going on would only write snapshots of broken weights."""
        self.nonfinite_steps = 0 if applied else self.nonfinite_steps + 1
        limit = MAX_NONFINITE_STEPS + (32 if self.scalers["generator"].is_enabled() else 0)
        if self.nonfinite_steps >= limit:
            raise UserError(f"training stopped at step {self.counters.step + 1}: the generator's gradient was "
                            f"non-finite for {limit} steps in a row (loss {loss:g}), so the run diverged; nothing "
                            f"was written for these steps. Lower --lr / --fake-lr or check --p-mean / --p-std, "
                            f"and start again or resume from {self.run.checkpoint_dir}")

    def _check_weights(self) -> None:
        """A UserError instead of a snapshot whose weights are not all finite."""
        for name, module in (("generator", self.generator), ("generator's EMA", self.ema)):
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise UserError(f"training stopped at step {self.counters.step}: the {name} weights are no "
                                f"longer finite, so no snapshot was written. Lower --lr and start again, or "
                                f"resume from {self.run.checkpoint_dir}")

    @contextlib.contextmanager
    def _networks(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """The teacher and the fake score as the generator step calls them, in the configured `teacher_mode`.

        eval: both networks in eval mode (no dropout). train-shared-dropout, the official generator step
        (pkulwj1994/diff_instruct training/di_loss.py `gloss`): both in train mode (dropout on), the fake
        drawing the teacher's dropout masks: the state of the RNG dropout uses (CUDA's on CUDA, here the CPU's
        too) is saved before the teacher call and restored before the fake call. Afterwards the teacher is
        back in eval mode and the fake stays in train mode, as there."""
        shared = self.config.teacher_mode == "train-shared-dropout"
        teacher = self.teacher if isinstance(self.teacher, nn.Module) else None
        _set_mode(self.fake, shared)
        if teacher is not None:
            _set_mode(teacher, shared)
        try:
            if not shared:
                yield self._call("teacher"), self._call("fake")
            else:
                memory: dict[str, torch.Tensor] = {}
                yield (_SharedDropout(self._call("teacher"), self.device, memory, record=True),
                       _SharedDropout(self._call("fake"), self.device, memory, record=False))
        finally:
            if teacher is not None:
                _set_mode(teacher, False)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The complete training state (plain tensors and data: torch.load(weights_only=True) reads it)."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_json(),
            "teacher": self.teacher_id,
            "counters": vars(self.counters).copy(),
            "log_window": {"values": dict(self.window.values), "counts": dict(self.window.counts),
                           "images": self.window.images},
            "generator": self.generator.state_dict(),
            "fake": self.fake.state_dict(),
            "ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_f": self.opt_f.state_dict(),
            **({} if self.adversary is None else {"adversary": self.adversary.state_dict()}),
            **({"reused": self._reused_global()} if self.config.reuse_images else {}),
            "scalers": {name: scaler.state_dict() for name, scaler in self.scalers.items()},
            "rng": {"loop": self.rng.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.fake.load_state_dict(state["fake"])
        self.ema.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_f.load_state_dict(state["opt_f"])
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])
        for name, scaler in self.scalers.items():
            scaler.load_state_dict(state["scalers"][name])
        reused = state.get("reused")
        self.reused = None if not reused else (self._local(reused["x"]), self._local(reused.get("c")))
        self.counters = Counters(**state["counters"])
        window = state.get("log_window")  # a resumed log record averages the steps the uninterrupted one does
        self.window = _Window() if window is None else _Window(dict(window["values"]), dict(window["counts"]),
                                                               images=window["images"])
        self.rng.set_state(state["rng"]["loop"])
        if self.rank == 0:
            torch.set_rng_state(state["rng"]["torch"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        else:  # the checkpoint holds rank 0's global state; the others continue from their own seed
            torch.manual_seed(derived_seed(self.config.seed, f"global/{self.rank}/{self.counters.step}"))

    def _reused_global(self) -> dict[str, torch.Tensor] | None:
        """--reuse-images: the global batch the next fake step reuses (every process's slice, on the CPU), so
        a resumed run equals the uninterrupted one under any process count; None before the first step."""
        if self.reused is None:
            return None
        x, c = (dist.all_gather(t) if t is not None else None for t in self.reused)
        return {"x": x.cpu(), **({} if c is None else {"c": c.cpu()})}

    def checkpoint(self) -> None:
        self._check_weights()
        state = self.state() if self.rank == 0 or self.config.reuse_images else None  # state() gathers
        if self.rank == 0:
            self.run.save_checkpoint(state, self.counters.step)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for callback in self.on_snapshot:
                    callback(self)
        dist.barrier()

    def resume(self, path) -> None:
        state = self.run.load_checkpoint(path)
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"checkpoint {path} has format {state.get('format')!r}, this version reads "
                            f"{STATE_FORMAT!r}; resume it with the refiner version that wrote it, or start a new --out")
        stored = state.get("teacher")
        if stored is not None and self.teacher_id is not None and stored["sha256"] != self.teacher_id["sha256"]:
            raise UserError(f"checkpoint {path} was trained with teacher {_describe(stored)}; this run loads "
                            f"{_describe(self.teacher_id)}. Resume with the same teacher file, or start a new --out")
        checked = ("teacher",) if stored is not None and self.teacher_id is not None else ()  # same sha256
        diffs = TrainConfig.from_json(state["config"]).differences(self.config, checked)
        if diffs:
            raise UserError(f"checkpoint {path} was written with another configuration: {'; '.join(diffs)}. "
                            f"Use the same options, or a new --out")
        self.load_state(state)
        if self.rank == 0:
            self.run.truncate_log(self.counters.step)
        self.echo(f"resumed from {path} at step {self.counters.step}")

    # -- the loop ----------------------------------------------------------------------------------------
    def iteration(self) -> list[dict[str, float]]:
        """`ratio` fake steps, then the generator step (with --reuse-pass the last fake step is inside it);
        their statistics, the generator step's last."""
        fake = [self.fake_step() for _ in range(self.config.ratio - self.config.reuse_pass)]
        return [*fake, self.generator_step()]

    def train(self) -> Counters:
        cfg = self.config
        while self.counters.fake_steps < cfg.fake_warmup:
            self.fake_step()
        self.window.start = time.perf_counter()  # img_per_s counts training steps, not the warm-up or setup
        with Progress(cfg.steps, desc="train", unit="step", initial=self.counters.step,
                      enabled=None if self.rank == 0 else False) as bar:
            while self.counters.step < cfg.steps:
                steps = self.iteration()
                for step_stats in steps:
                    self.window.add(**step_stats)
                stats = steps[-1]  # the generator step's
                self.window.images += cfg.batch
                bar.update(1, loss=stats["loss_gen"])
                step = self.counters.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self._log(self.window)
                    self.window = _Window()
                if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.steps:
                    self.checkpoint()
        self.checkpoint()
        skipped = self.counters.skipped_generator + self.counters.skipped_fake
        if skipped:
            self.echo(f"warning: {skipped} steps were skipped for non-finite gradients "
                      f"({self.counters.skipped_generator} generator, {self.counters.skipped_fake} fake); "
                      f"see 'skipped_*' in {self.run.log_path}")
        return self.counters

    def _log(self, window: _Window) -> None:
        rss = psutil.Process().memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        seconds = time.perf_counter() - window.start
        record = {"step": self.counters.step, "kimg": self.counters.nimg / 1000, **window.means(),
                  "skipped_generator": self.counters.skipped_generator,
                  "skipped_fake": self.counters.skipped_fake,
                  "img_per_s": window.images / max(seconds, 1e-9),
                  "peak_rss_mb": self.peak_rss / 2**20}
        if self.device.type == "cuda":
            record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.rank == 0:
            self.run.log(record)


def _describe(identity: dict[str, Any]) -> str:
    return f"{identity.get('name', '?')} (sha256 {str(identity.get('sha256', '?'))[:16]}…)"
