"""The Diff-Instruct training loop (DESIGN.md §4; Luo et al. 2023, Algorithm 1).

One iteration = `ratio` fake-score steps, then one generator step:
1. fake step:  x = sg[G(z, c)] (optionally augmented by EDM's AugmentPipe, the fake told how), σ ~ p(σ),
   x_t = x + σε;  L(φ) = λ(σ)‖D_φ(x_t, σ, c) − x‖²;
2. generator step:  x = G(z', c'), x_t = x + σ'ε';  D_r = teacher(x_t), D_f = fake(x_t) without gradients;
   L(θ) = ⟨sg[D_f − D_r], x⟩ / N  (or another loss of refiner.losses); both networks in eval mode, or in
   train mode with shared dropout masks as the official code (`teacher_mode`).

The loop only sees the `Generator` and `Denoiser` interfaces. It owns mixed precision, gradient hygiene
(a non-finite gradient never reaches the weights: the step is skipped and counted), the EMA, atomic
checkpoints of the whole training state, the JSON-lines log, the progress bar and data parallelism.

Randomness: every draw of the loop (latents, labels, σ, ε) comes from one CPU `torch.Generator` seeded
with `config.seed`, and every process draws the *global* batch and keeps its own slice. So N processes
follow exactly the trajectory of one process with the same global batch, and a checkpoint resumes
under any process count.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import torch
from torch import nn

from fileformats.errors import UserError
from fileformats.progress import Progress
from refiner import distributed as dist
from refiner.augment import AugmentPipe
from refiner.config import TrainConfig
from refiner.ema import ema_beta, update_ema
from refiner.losses import add_noise, denoising_loss, generator_loss
from refiner.rundir import RunDir
from refiner.sigma import KarrasGridSigma, LogNormalSigma


def make_sigma_sampler(config: TrainConfig):
    if config.sigma == "lognormal":
        return LogNormalSigma(config.p_mean, config.p_std)
    return KarrasGridSigma()


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


class Trainer:
    """Runs the loop for a generator, a frozen teacher and a trainable fake-score network.

    `generator` and `fake` are nn.Modules on `device`; `teacher` is any Denoiser. `on_snapshot` callbacks
    run on rank 0 after every checkpoint (and at the end) with the trainer as argument.
    """

    def __init__(self, config: TrainConfig, generator: nn.Module, teacher: Callable, fake: nn.Module,
                 run: RunDir, device: torch.device, on_snapshot: tuple[Callable[[Trainer], None], ...] = (),
                 echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        self.config = config.validate()
        self.world, self.rank = dist.world_size(), dist.rank()
        if config.batch % self.world:
            raise UserError(f"--batch {config.batch} must be divisible by the number of processes ({self.world})")
        self.generator, self.teacher, self.fake = generator, teacher, fake
        self.run, self.device, self.on_snapshot = run, device, on_snapshot
        self.echo = echo if self.rank == 0 else (lambda s: None)
        self.ema = copy.deepcopy(generator).requires_grad_(False).eval()
        self.opt_g = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad],
                                      lr=config.lr, betas=config.betas)
        self.opt_f = torch.optim.Adam([p for p in fake.parameters() if p.requires_grad],
                                      lr=config.fake_lr, betas=config.betas)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.sigma_sampler = make_sigma_sampler(config)
        self.loss_fn = generator_loss(config.loss)
        self.augment = AugmentPipe(p=config.augment) if config.augment > 0 else None
        if self.augment is not None and not _takes_augment_labels(fake):
            raise UserError("--augment needs a fake-score network that takes augmentation labels (an EDM U-Net); "
                            "this one does not: use --augment 0")
        self.sigma_data = float(getattr(teacher, "sigma_data", 0.5))
        self.counters = Counters()
        # fp16 loss scaling, one scaler per loss, as the two differ in scale by orders of magnitude. The
        # denoising loss's weight λ(σ) ~ 1/σ² makes its gradients large at small σ: scaled by PyTorch's
        # default 2^16 (even by 2^11) they overflow fp16, so its scale starts at 1 and grows (x2 after
        # every 2000 finite steps); the generator loss ⟨D_f − D_r, x⟩ has small gradients and starts at 2^16.
        fp16 = config.precision == "fp16" and device.type == "cuda"
        self.scalers = {"fake": torch.amp.GradScaler("cuda", init_scale=1.0, enabled=fp16),
                        "generator": torch.amp.GradScaler("cuda", init_scale=2.0**16, enabled=fp16)}
        self.peak_rss = 0
        dist.broadcast_module(generator)
        dist.broadcast_module(fake)
        dist.broadcast_module(self.ema)

    # -- randomness: global draws, local slices --------------------------------------------------------
    def _local(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n].to(self.device)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Latents, labels, σ and ε for one global batch (drawn on every rank, sliced per rank)."""
        b = self.config.batch
        z = self.generator.sample_latents(b, self.rng)
        c = self.generator.sample_labels(b, self.rng)
        sigma = self.sigma_sampler(b, self.rng)
        noise = torch.randn((b, *self.generator.data_shape), generator=self.rng)
        return self._local(z), self._local(c), self._local(sigma), self._local(noise)

    def _autocast(self):
        if self.device.type != "cuda" or self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    # -- one optimiser step with gradient hygiene ------------------------------------------------------
    def _apply(self, loss: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer,
               scale: float, scaler: torch.amp.GradScaler) -> tuple[float, bool]:
        """Backward, average over processes, check, clip, step. Returns (grad norm, applied)."""
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss * scale).backward()
        grads = [p.grad for p in params if p.grad is not None]
        dist.average_gradients(grads)
        scaler.unscale_(opt)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
        finite = bool(torch.isfinite(norm))
        if finite:
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        scaler.update()
        return float(norm), finite

    def fake_step(self) -> dict[str, float]:
        z, c, sigma, noise = self._draw()
        with torch.no_grad(), self._autocast():
            self.generator.eval()
            x = self.generator(z, c).float()
            self.generator.train()
        augment: dict[str, torch.Tensor] = {}
        if self.augment is not None:  # EDM's AugmentPipe; the network is told what was done (augment_labels)
            draws = {k: self._local(v) for k, v in self.augment.sample(self.config.batch, self.rng).items()}
            x, augment["augment_labels"] = self.augment(x, draws)
        self.fake.train()
        with self._autocast():
            denoised = self.fake(add_noise(x, sigma, noise), sigma, c, **augment).float()
        loss = denoising_loss(denoised, x, sigma, self.sigma_data)
        params = [p for p in self.fake.parameters() if p.requires_grad]
        norm, ok = self._apply(loss, params, self.opt_f, self.config.fake_loss_scale, self.scalers["fake"])
        self.counters.fake_steps += 1
        self.counters.skipped_fake += not ok
        return {"loss_fake": float(loss.detach()), "grad_norm_fake": norm}

    def generator_step(self) -> dict[str, float]:
        z, c, sigma, noise = self._draw()
        with self._autocast():
            x = self.generator(z, c).float()
            d_real, d_fake = self._denoise(add_noise(x.detach(), sigma, noise), sigma, c)
        loss = self.loss_fn(x, d_real, d_fake, sigma)
        params = [p for p in self.generator.parameters() if p.requires_grad]
        norm, ok = self._apply(loss, params, self.opt_g, self.config.loss_scale, self.scalers["generator"])
        self.counters.nimg += self.config.batch
        if not ok:
            self.counters.skipped_generator += 1
            self.echo(f"warning: step {self.counters.step + 1}: non-finite generator gradient; the update "
                      f"was skipped ({self.counters.skipped_generator} skipped so far)")
        c_cfg = self.config
        if c_cfg.ema > 0:
            beta = ema_beta(c_cfg.batch, self.counters.nimg, c_cfg.ema, c_cfg.ema_rampup)
            update_ema(self.ema, self.generator, beta)
        else:
            update_ema(self.ema, self.generator, 0.0)
        self.counters.step += 1
        return {"loss_gen": float(loss.detach()), "grad_norm_gen": norm, "sigma_mean": float(sigma.mean()),
                "sigma_min": float(sigma.min()), "sigma_max": float(sigma.max())}

    def _denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """D_r = teacher(x_t) and D_f = fake(x_t), without gradients, in the configured `teacher_mode`.

        eval: both networks in eval mode (no dropout). train-shared-dropout, the official generator step
        (pkulwj1994/diff_instruct training/di_loss.py `gloss`): both in train mode (dropout on), the fake
        drawing the teacher's dropout masks: the state of the RNG dropout uses (CUDA's on CUDA, here the CPU's
        too) is saved before the teacher call and restored before the fake call. Afterwards the teacher is
        back in eval mode and the fake stays in train mode, as there."""
        shared = self.config.teacher_mode == "train-shared-dropout"
        teacher = self.teacher if isinstance(self.teacher, nn.Module) else None
        self.fake.train(shared)
        if teacher is not None:
            teacher.train(shared)
        with torch.no_grad():
            state = _dropout_rng_state(self.device) if shared else None
            d_real = self.teacher(x_t, sigma, c).float()
            if state is not None:
                _set_dropout_rng_state(self.device, state)
            d_fake = self.fake(x_t, sigma, c).float()
        if teacher is not None:
            teacher.eval()
        return d_real, d_fake

    # -- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The complete training state (plain tensors and data: torch.load(weights_only=True) reads it)."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_json(),
            "counters": vars(self.counters).copy(),
            "generator": self.generator.state_dict(),
            "fake": self.fake.state_dict(),
            "ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_f": self.opt_f.state_dict(),
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
        for name, scaler in self.scalers.items():
            scaler.load_state_dict(state["scalers"][name])
        self.counters = Counters(**state["counters"])
        self.rng.set_state(state["rng"]["loop"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def checkpoint(self) -> None:
        if self.rank == 0:
            self.run.save_checkpoint(self.state(), self.counters.step)
            for callback in self.on_snapshot:
                callback(self)
        dist.barrier()

    def resume(self, path) -> None:
        state = self.run.load_checkpoint(path)
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"checkpoint {path} has format {state.get('format')!r}, this version reads "
                            f"{STATE_FORMAT!r}; resume it with the refiner version that wrote it, or start a new --out")
        diffs = TrainConfig.from_json(state["config"]).differences(self.config)
        if diffs:
            raise UserError(f"checkpoint {path} was written with another configuration: {'; '.join(diffs)}. "
                            f"Use the same options, or a new --out")
        self.load_state(state)
        if self.rank == 0:
            self.run.truncate_log(self.counters.step)
        self.echo(f"resumed from {path} at step {self.counters.step}")

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self) -> Counters:
        cfg = self.config
        while self.counters.fake_steps < cfg.fake_warmup:
            self.fake_step()
        window = _Window()
        with Progress(cfg.steps, desc="train", unit="step", initial=self.counters.step,
                      enabled=None if self.rank == 0 else False) as bar:
            while self.counters.step < cfg.steps:
                for _ in range(cfg.ratio):
                    window.add(**self.fake_step())
                stats = self.generator_step()
                window.add(**stats)
                window.images += cfg.batch
                bar.update(1, loss=stats["loss_gen"])
                step = self.counters.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self._log(window)
                    window = _Window()
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
