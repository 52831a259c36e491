"""Settings of `refiner distill` that reproduce published one-step distillation recipes.

Each preset names its source (docs/diff_instruct.md §2). Every value can be overridden on the
command line; `refiner distill --help` prints this table. Durations and snapshot intervals are given in
thousands of generator images (kimg), as the EDM code bases count them, and turn into steps with the
batch size actually used.

The `cifar10-*` presets reproduce the official code exactly: the generator step runs the teacher and the
fake score in train mode with shared dropout masks (`teacher_mode` train-shared-dropout, the official
`gloss`), and the fake-score step sees EDM's AugmentPipe at p = 0.12 (`augment`, di_train.py's default;
the official loop passes no augmentation to the generator step). All networks use the preset's dropout,
as the official code builds them with `--dropout`. Without --preset the default keeps our cleaner choice:
both networks in eval mode in the generator step, no augmentation.
"""

from __future__ import annotations

import difflib
import math
import textwrap
from dataclasses import dataclass
from typing import Any

from common.errors import UserError
from refiner.config import TrainConfig


@dataclass(frozen=True)
class Preset:
    """One recipe. `dropout` None keeps the teacher's own dropout; `shape` (resolution, classes) is what
    the recipe's teacher has (a mismatch only warns)."""

    name: str
    source: str
    batch: int
    lr: float  # generator
    fake_lr: float
    betas: tuple[float, float]
    ema: float  # half-life, kimg
    precision: str
    sigma_init: float
    dropout: float | None
    kimg: float  # duration
    snapshot_kimg: float
    loss: str = "ikl"
    ratio: int = 1
    shape: tuple[int, int] | None = None
    fake_warmup_kimg: float = 0.0  # images of fake-score (and discriminator) updates before the first generator one
    teacher_mode: str = "eval"
    augment: float = 0.0

    def steps(self, kimg: float, batch: int | None = None) -> int:
        """Generator steps that show `kimg` thousand images at this (or the given) batch size."""
        return max(0, math.ceil(kimg * 1000 / (batch or self.batch)))

    def train_values(self, batch: int | None = None) -> dict[str, Any]:
        """The TrainConfig fields this recipe sets, its durations in steps at this (or the given) batch."""
        return dict(steps=self.steps(self.kimg, batch), batch=self.batch, lr=self.lr, fake_lr=self.fake_lr,
                    betas=self.betas, ratio=self.ratio, ema=self.ema, loss=self.loss, precision=self.precision,
                    snapshot_every=self.steps(self.snapshot_kimg, batch),
                    fake_warmup=self.steps(self.fake_warmup_kimg, batch), teacher_mode=self.teacher_mode,
                    augment=self.augment)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.train_values())

    def describe(self) -> str:
        dropout = "teacher's" if self.dropout is None else f"{self.dropout:g}"
        return (f"batch {self.batch}, lr {self.lr:g}, fake-lr {self.fake_lr:g}, beta1 {self.betas[0]:g}, "
                f"beta2 {self.betas[1]:g}, ema {self.ema:g} (kimg), precision {self.precision}, "
                f"sigma-init {self.sigma_init:g}, dropout {dropout}, loss {self.loss}, ratio {self.ratio}, "
                f"teacher-mode {self.teacher_mode}, augment {self.augment:g}, "
                f"kimg {self.kimg:g}, snapshot-kimg {self.snapshot_kimg:g}"
                + (f", fake-warmup {self.fake_warmup_kimg:g} kimg" if self.fake_warmup_kimg else ""))


_DI_README = ("Diff-Instruct README (pkulwj1994/diff_instruct): torchrun di_train.py --arch ddpmpp --batch 128 "
              "--lr 1e-5 --glr 1e-5 --init_sigma 1.0 --fp16 0 --ls 1.0 --sgls 1.0 --tick 10 --snap 50; Adam "
              "(0, 0.999) hard-coded; code defaults: ema 0.5 Mimg, dropout 0.13, augment 0.12 (fake-score "
              "step), duration 200 Mimg; teacher and fake score in train mode with shared dropout masks in "
              "the generator step (training/di_loss.py gloss)")

_SID_SCRIPT = ("SiD run_sid.sh (mingyuanzhou/SiD; Adam (0, 0.999), the loss's defaults: alpha 1.2, generator "
               "sigma t ~ U[0, 0.8] on the Karras schedule, fake-score ln sigma ~ N(-1.2, 1.2^2), loss scale 100)")
_SIDA_SCRIPT = ("SiDA run_sida.sh (mingyuanzhou/SiD branch sida, from scratch; the SiD^2A runs that start from a "
                "SiD generator, run_sid_sida.sh, are not reproduced). sida_training_loop.py: no generator update "
                "in the first 100 kimg (fake-warmup), the adversarial term from 200 kimg on (gan-start-kimg 100 "
                "after the warm-up; duration 300 Mimg = 100 kimg warm-up + 299900 kimg); real images from --data; "
                "Adam (0, 0.999); the fake network's gradients "
                "clipped by value 1 (not reproduced)")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cifar10-uncond", _DI_README + " (--cond 0 --edm_model cifar10-uncond)",
           batch=128, lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), ema=500.0, precision="fp32", sigma_init=1.0,
           dropout=0.13, kimg=200_000, snapshot_kimg=500, shape=(32, 0), teacher_mode="train-shared-dropout",
           augment=0.12),
    Preset("cifar10-cond", _DI_README + " (the same with --cond 1 --edm_model cifar10-cond)",
           batch=128, lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), ema=500.0, precision="fp32", sigma_init=1.0,
           dropout=0.13, kimg=200_000, snapshot_kimg=500, shape=(32, 10), teacher_mode="train-shared-dropout",
           augment=0.12),
    Preset("imagenet64-cond",
           "SiD run_sid.sh imagenet64-cond (mingyuanzhou/SiD; Diff-Instruct published no ImageNet recipe): "
           "--batch 8192 --lr 4e-6 --glr 4e-6 --fp16 1 --dropout 0.1 --augment 0 --ema 2 --init_sigma 2.5 "
           "--duration 100 --tick 20 --snap 50; Adam (0, 0.999). SiD's own loss (alpha 1.2, tmax 800) is "
           "replaced by Diff-Instruct's",
           batch=8192, lr=4e-6, fake_lr=4e-6, betas=(0.0, 0.999), ema=2000.0, precision="fp16", sigma_init=2.5,
           dropout=0.10, kimg=100_000, snapshot_kimg=1000, shape=(64, 1000)),
    Preset("cifar10-uncond-sid", _SID_SCRIPT + " cifar10-uncond: --alpha 1.2 --tmax 800 --init_sigma 2.5 --batch 256 "
           "--lr 1e-5 --glr 1e-5 --fp16 0 --ls 1 --lsg 100 --duration 500 --tick 10 --snap 50; sid_train.py "
           "defaults: --ema 0.5 (Mimg), --dropout 0.13, --augment 0.12 (not reproduced)",
           batch=256, lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), ema=500.0, precision="fp32", sigma_init=2.5,
           dropout=0.13, kimg=500_000, snapshot_kimg=500, loss="sid", shape=(32, 0)),
    Preset("cifar10-cond-sid", _SID_SCRIPT + " cifar10-cond: the same with --cond 1 --duration 800",
           batch=256, lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), ema=500.0, precision="fp32", sigma_init=2.5,
           dropout=0.13, kimg=800_000, snapshot_kimg=500, loss="sid", shape=(32, 10)),
    Preset("imagenet64-cond-sid", _SID_SCRIPT + " imagenet64-cond: --alpha 1.2 --cond 1 --tmax 800 --init_sigma 2.5 "
           "--batch 8192 --arch adm --lr 4e-6 --glr 4e-6 --fp16 1 --ls 1 --lsg 100 --dropout 0.1 --augment 0 "
           "--ema 2 --duration 1000 --tick 20 --snap 50 (Adam eps 1e-6 under fp16: not reproduced, ours 1e-8)",
           batch=8192, lr=4e-6, fake_lr=4e-6, betas=(0.0, 0.999), ema=2000.0, precision="fp16", sigma_init=2.5,
           dropout=0.10, kimg=1_000_000, snapshot_kimg=1000, loss="sid", shape=(64, 1000)),
    Preset("imagenet64-cond-dmd2", "DMD2 experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6"
           "_scratch.sh (tianweiy/DMD2; FID 1.51 after 193.5k iterations, 1.28 when resumed from the GAN-free run "
           "with lr 5e-7): 7 GPUs x --batch_size 40, --generator_lr 2e-6 --guidance_lr 2e-6 "
           "--dfake_gen_update_ratio 5 --gan_classifier --cls_loss_weight 1e-2 --gen_cls_loss_weight 3e-3 "
           "--diffusion_gan --diffusion_gan_max_timestep 1000 --conditioning_sigma 80 (sigma-init), BF16 "
           "(experiments/imagenet/README.md), no EMA, dropout 0 (edm_network.py); AdamW (0.9, 0.999) with weight "
           "decay 0.01 and a 500-step warm-up of the learning rate (not reproduced: Adam, constant lr); 200k "
           "iterations = 40k generator updates = 11200 kimg; checkpoints every 500 iterations",
           batch=280, lr=2e-6, fake_lr=2e-6, betas=(0.9, 0.999), ema=0.0, precision="bf16", sigma_init=80.0,
           dropout=0.0, kimg=11_200, snapshot_kimg=28, loss="dmd2", ratio=5, shape=(64, 1000)),
    Preset("cifar10-uncond-sida", _SIDA_SCRIPT + " cifar10-uncond: --alpha 1 --tmax 800 --init_sigma 2.5 --batch 256 "
           "--lr 1e-5 --glr 1e-5 --fp16 0 --ls 1 --lsg 100 --lsd 1 --lsg_gan 0.01 --duration 300 --tick 10 --snap 50;"
           " sida_train.py defaults: --ema 0.5 (Mimg), --dropout 0.13, --augment 0.12 (not reproduced)",
           batch=256, lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), ema=500.0, precision="fp32", sigma_init=2.5,
           dropout=0.13, kimg=299_900, snapshot_kimg=500, loss="sida", shape=(32, 0), fake_warmup_kimg=100),
    Preset("cifar10-cond-sida", _SIDA_SCRIPT + " cifar10-cond: the same with --cond 1",
           batch=256, lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), ema=500.0, precision="fp32", sigma_init=2.5,
           dropout=0.13, kimg=299_900, snapshot_kimg=500, loss="sida", shape=(32, 10), fake_warmup_kimg=100),
    Preset("imagenet64-cond-sida", _SIDA_SCRIPT + " imagenet64-cond: --cond 1 --alpha 1 --tmax 800 --init_sigma 2.5 "
           "--batch 8192 --arch adm --lr 4e-6 --glr 4e-6 --fp16 1 --ls 1 --lsg 100 --lsd 1 --lsg_gan 0.01 "
           "--dropout 0.1 --augment 0 --ema 2 --duration 300 --tick 20 --snap 50",
           batch=8192, lr=4e-6, fake_lr=4e-6, betas=(0.0, 0.999), ema=2000.0, precision="fp16", sigma_init=2.5,
           dropout=0.10, kimg=299_900, snapshot_kimg=1000, loss="sida", shape=(64, 1000), fake_warmup_kimg=100),
)}

DEFAULT = Preset("default", "without --preset: Diff-Instruct's CIFAR-10 values with bf16 autocast on GPUs "
                 "that support it (precision auto; fp32 elsewhere), "
                 "with the teacher's own dropout, teacher and fake score in eval mode in the generator step "
                 "and no augmentation (our choice, not the official code's)",
                 batch=128, lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), ema=500.0, precision="auto", sigma_init=1.0,
                 dropout=None, kimg=200_000, snapshot_kimg=500)


def get_preset(name: str | None) -> Preset:
    """The preset called `name` (None: DEFAULT), or a UserError listing the valid names."""
    if name is None:
        return DEFAULT
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"unknown preset {name!r}{hint}; choose one of {', '.join(PRESETS)} "
                    "(refiner distill --help lists their values)")


def presets_help() -> str:
    """The presets and their values, for `refiner distill --help` (click keeps \\b paragraphs as is)."""
    lines = ["\b", "Presets (every value can be overridden by the option of the same name):"]
    for p in (*PRESETS.values(), DEFAULT):
        lines += textwrap.wrap(f"{p.name}: {p.describe()}", 100, initial_indent="  ", subsequent_indent="      ",
                               break_on_hyphens=False)
        lines += textwrap.wrap(f"source: {p.source}", 100, initial_indent="    ", subsequent_indent="      ")
    return "\n".join(lines)
