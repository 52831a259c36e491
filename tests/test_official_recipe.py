"""The exact mode of the official Diff-Instruct recipe in the loop: teacher and fake score in train mode with
shared dropout masks in the generator step, EDM's AugmentPipe on the fake-score step, resume bit-exact.

The networks are the small EDM fixture (EDMPrecond + DDPM++, 16x16, 10 classes, dropout 0.13, 9-dim
augmentation labels)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from common.errors import UserError
from gan_adapters.onestep import OneStepGenerator
from refiner.augment import AugmentPipe
from refiner.cli import cli
from refiner.cli.distill import distill_config
from refiner.cli.options import TRAINING_KEYS
from refiner.config import TrainConfig
from refiner.jobs import trainable_copy
from refiner.loop import Trainer
from refiner.presets import DEFAULT, PRESETS, get_preset
from refiner.rundir import RunDir
from teachers.edm_loader import load_teacher
from teachers.edm_precond import EDMPrecond
from tests.helpers import DATA, assert_same, small_edm_kwargs

TEACHER = DATA / "edm-small-ddpmpp-edm-cond.pkl"
CPU = torch.device("cpu")


def _trainer(tmp: Path, name: str = "run", fake: nn.Module | None = None, generator: nn.Module | None = None,
             **overrides) -> Trainer:
    teacher = load_teacher(TEACHER)
    config = TrainConfig(**{**dict(steps=4, batch=4, lr=1e-4, fake_lr=1e-4, ema=1.0, log_every=1,
                                   snapshot_every=2, device="cpu"), **overrides})
    generator = generator or OneStepGenerator.from_teacher(teacher, sigma_init=1.0).train()
    fake = fake if fake is not None else trainable_copy(teacher, config.augment > 0)
    run = RunDir(tmp / name)
    run.prepare(config)
    return Trainer(config, generator, teacher, fake, run, CPU, echo=lambda s: None)


def _noisy_batch(n: int = 4):
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.05, 0.5, 1.0, 3.0])[:n]
    x_t = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + sigma.reshape(-1, 1, 1, 1) * torch.randn(n, 3, 16, 16,
                                                                                               generator=g)
    labels = torch.eye(10)[torch.arange(n)]
    return x_t, sigma, labels


def _denoise(trainer: Trainer, x_t, sigma, c):
    """D_r and D_f as the generator step computes them (the networks in the trainer's teacher_mode)."""
    with trainer._networks() as (teacher, fake), torch.no_grad():
        return teacher(x_t, sigma, c).float(), fake(x_t, sigma, c).float()


def test_shared_dropout_gives_teacher_and_fake_one_recorded_mask(tmp_path: Path):
    """With the fake an exact copy of the teacher, train-shared-dropout gives D_f == D_r bit for bit, both
    equal to one train-mode teacher call under the recorded RNG state, and they use one mask's worth of
    randomness; two train-mode calls without the restore (independent masks) differ."""
    trainer = _trainer(tmp_path, teacher_mode="train-shared-dropout")
    x_t, sigma, c = _noisy_batch()
    recorded = torch.get_rng_state()
    d_real, d_fake = _denoise(trainer, x_t, sigma, c)
    after = torch.get_rng_state()
    assert torch.equal(d_real, d_fake)
    assert not trainer.teacher.training and trainer.fake.training  # as the official gloss leaves them

    torch.set_rng_state(recorded)
    with torch.no_grad():
        one_mask = trainer.teacher.train()(x_t, sigma, c)
        assert torch.equal(torch.get_rng_state(), after)  # the pair consumed exactly one mask
        independent = trainer.fake.train()(x_t, sigma, c)  # next draws: another mask
        trainer.teacher.eval()
        no_dropout = trainer.teacher(x_t, sigma, c)
    assert torch.equal(d_real, one_mask)
    assert (independent - one_mask).abs().max() > 1e-3
    assert (no_dropout - one_mask).abs().max() > 1e-3  # dropout is really on


def test_eval_mode_runs_both_networks_without_dropout(tmp_path: Path):
    trainer = _trainer(tmp_path)
    x_t, sigma, c = _noisy_batch()
    state = torch.get_rng_state()
    d_real, d_fake = _denoise(trainer, x_t, sigma, c)
    assert torch.equal(torch.get_rng_state(), state)  # no dropout draws
    with torch.no_grad():
        assert torch.equal(d_real, trainer.teacher.eval()(x_t, sigma, c))
    assert torch.equal(d_fake, d_real)
    assert not trainer.fake.training and not trainer.teacher.training


class _ConstantImage(nn.Module):
    """A generator whose every sample is one fixed, asymmetric 16x16 image."""

    z_dim, c_dim, data_shape = 1, 10, (3, 16, 16)

    def __init__(self):
        super().__init__()
        y, x = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        image = torch.stack([torch.sin(2 * x + 1), torch.cos(3 * y) * x, 0.5 * x + 0.3 * y])
        self.image = nn.Parameter(image[None])

    def sample_latents(self, n, generator=None):
        return torch.randn(n, 1, generator=generator)

    def sample_labels(self, n, generator=None):
        return torch.eye(10)[torch.randint(10, (n,), generator=generator)]

    def forward(self, z, c=None):
        return self.image.expand(z.shape[0], -1, -1, -1)


class _Spy(nn.Module):
    """Wraps the fake score and records what it is called with."""

    def __init__(self, fake: nn.Module):
        super().__init__()
        self.fake, self.calls = fake, []

    def forward(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append((x.detach().clone(), sigma.clone(), augment_labels))
        return self.fake(x, sigma, labels, augment_labels=augment_labels)


def test_augmented_fake_step_gives_the_network_the_labels_of_the_applied_augmentation(tmp_path: Path):
    """The fake-score step's noisy input is the augmented generator image and its augment_labels describe
    exactly that augmentation: from the labels alone (flip bit, rotation angle from cos θ − 1 and sin θ) the
    image is rebuilt. σ ≈ 2e-9 makes the noise invisible; p = 1 with flips and rotations only."""
    pipe = AugmentPipe(p=1.0, xflip=1, yflip=0, scale=0, rotate_frac=1, aniso=0, translate_frac=0)
    torch.manual_seed(0)
    spy = _Spy(EDMPrecond(**{**small_edm_kwargs(resolution=16, label_dim=10), "augment_dim": pipe.label_dim}))
    generator = _ConstantImage()
    trainer = _trainer(tmp_path, fake=spy, generator=generator, augment=1.0, p_mean=-20.0, p_std=1e-6, batch=16)
    trainer.augment = pipe
    trainer.fake_step()
    (x_t, sigma, labels), = spy.calls
    assert sigma.max() < 1e-8 and labels.shape == (16, 3)
    flips, theta = labels[:, 0], torch.atan2(labels[:, 2], labels[:, 1] + 1)
    assert 0 < flips.sum() < 16 and theta.abs().max() > 1
    rebuilt, _ = pipe(generator(torch.zeros(16, 1)).detach(), {"xflip": flips, "rotate": theta})
    torch.testing.assert_close(x_t, rebuilt, rtol=0, atol=1e-5)
    assert (x_t - generator.image.detach()).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every image moved


def test_official_mode_resumes_bit_exactly(tmp_path: Path):
    """Augmentation draws come from the loop's generator and dropout from the saved torch RNG: a run
    resumed from its step-1 checkpoint ends where the straight run ends, bit for bit."""
    official = dict(teacher_mode="train-shared-dropout", augment=0.5, steps=2, snapshot_every=1)
    torch.manual_seed(0)
    straight = _trainer(tmp_path, "straight", **official)
    straight.train()
    torch.manual_seed(0)  # the same dropout masks up to the checkpoint (the loop does not seed them)
    first = _trainer(tmp_path, "resumed", **{**official, "steps": 1})
    first.train()
    torch.manual_seed(2)  # a different process state: the checkpoint must carry everything
    resumed = _trainer(tmp_path, "resumed-2", **official)
    resumed.resume(RunDir(tmp_path / "resumed").checkpoints()[-1])
    resumed.train()
    a, b = straight.state(), resumed.state()
    for key in ("generator", "fake", "ema", "opt_g", "opt_f", "rng", "counters"):
        assert_same(a[key], b[key], key)
    assert any(k.endswith("map_augment.weight") for k in a["fake"])


def test_zero_initialised_augment_input_keeps_the_outputs():
    """A teacher without augmentation labels (the demo's) gets a fake with a zero label map: its outputs
    with any labels equal the teacher's."""
    kwargs = {**small_edm_kwargs(resolution=16), "augment_dim": 0}
    torch.manual_seed(0)
    net = EDMPrecond(**kwargs).eval()
    fake = trainable_copy(net, augment=True)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 2.0])
    labels = torch.randn(2, 9)
    with torch.no_grad():
        assert torch.equal(fake(x, sigma, augment_labels=labels), net(x, sigma))
    assert fake.model.map_augment.weight.requires_grad


def test_presets_use_the_official_settings_and_the_default_our_choice():
    for name in ("cifar10-uncond", "cifar10-cond"):
        config = PRESETS[name].train_config()
        assert (config.teacher_mode, config.augment) == ("train-shared-dropout", 0.12)
    assert (DEFAULT.train_config().teacher_mode, DEFAULT.train_config().augment) == ("eval", 0.0)
    assert TrainConfig().teacher_mode == "eval" and TrainConfig().augment == 0


def test_distill_takes_the_presets_recipe_unless_overridden():
    def config(preset: str, **given):
        kwargs = {**{k: None for k in TRAINING_KEYS}, "beta1": None, "beta2": None, **given}
        return distill_config(get_preset(preset), kwargs, None, None)

    assert (config("cifar10-cond").teacher_mode, config("cifar10-cond").augment) == ("train-shared-dropout", 0.12)
    overridden = config("cifar10-cond", teacher_mode="eval", augment=0.0)
    assert (overridden.teacher_mode, overridden.augment) == ("eval", 0.0)
    assert (config("imagenet64-cond").teacher_mode, config("imagenet64-cond").augment) == ("eval", 0.0)


@pytest.mark.parametrize("args, needle", [
    (["--teacher-mode", "train"], "'train' is not one of"),
    (["--augment", "1.5"], "--augment is a probability in [0, 1]"),
    (["--augment", "0.12"], "--augment needs a fake-score network that takes augmentation labels"),
])
def test_bad_recipe_options_are_one_line_errors(tmp_path: Path, args, needle):
    result = CliRunner().invoke(cli, ["toy", "--out", str(tmp_path / "toy"), "--steps", "1", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_wrong_augment_label_size_is_refused():
    net = EDMPrecond(**{**small_edm_kwargs(resolution=16), "augment_dim": 4})
    with pytest.raises(UserError, match="4-dim augmentation labels"):
        trainable_copy(net, augment=True)


def test_augment_pipe_sizes_match_the_networks():
    assert AugmentPipe().label_dim == 9 == small_edm_kwargs()["augment_dim"]
    assert math.isclose(AugmentPipe().p, 0.12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shared_dropout_on_cuda_restores_the_cuda_generator(tmp_path: Path):
    """On CUDA dropout draws from the device's generator: that one is saved and restored (as the official
    code does), so the copy gives D_f == D_r there too."""
    cuda = torch.device("cuda")
    teacher = load_teacher(TEACHER, device=cuda)
    config = TrainConfig(steps=1, batch=4, device="cuda", teacher_mode="train-shared-dropout")
    run = RunDir(tmp_path / "cuda")
    run.prepare(config)
    generator = OneStepGenerator.from_teacher(teacher, sigma_init=1.0).train()
    trainer = Trainer(config, generator, teacher, trainable_copy(teacher), run, cuda, echo=lambda s: None)
    x_t, sigma, c = (t.to(cuda) for t in _noisy_batch())
    d_real, d_fake = _denoise(trainer, x_t, sigma, c)
    assert torch.equal(d_real, d_fake)
    with torch.no_grad():
        assert (teacher.eval()(x_t, sigma, c) - d_real).abs().max() > 1e-3
