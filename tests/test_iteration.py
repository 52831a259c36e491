"""The optimised iteration (fused Adam, multi-tensor EMA and gradient norm, --compile, --reuse-images) against a
plain implementation of Diff-Instruct's Algorithm 1 written out here, and the compile fallback."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from gan_adapters.mlp import MLPGenerator
from refiner import loop
from refiner.config import TrainConfig
from refiner.loop import Trainer, make_sigma_sampler
from refiner.rundir import RunDir
from refiner.toy import run_toy
from teachers.mlp import MLPDenoiser
from tests.helpers import assert_same

CONFIG = TrainConfig(steps=4, batch=16, lr=3e-3, fake_lr=2e-3, betas=(0.5, 0.99), ema=0.05, ema_rampup=0.5,
                     grad_clip=0.5, device="cpu")


def _networks() -> tuple[MLPGenerator, MLPDenoiser, MLPDenoiser]:
    torch.manual_seed(0)
    teacher = MLPDenoiser(dim=2, sigma_data=0.7).requires_grad_(False)
    return MLPGenerator(dim=2, z_dim=2), teacher, copy.deepcopy(teacher).requires_grad_(True)


def _trainer(tmp_path: Path, config: TrainConfig, echo=lambda s: None) -> Trainer:
    generator, teacher, fake = _networks()
    return Trainer(config, generator, teacher, fake, RunDir(tmp_path / "run"), torch.device("cpu"), echo=echo)


def _iterate(trainer: Trainer, n: int) -> None:
    for _ in range(n):
        trainer.fake_step()
        trainer.generator_step()


def _plain(config: TrainConfig, iterations: int) -> dict[str, torch.nn.Module]:
    """Algorithm 1 of Diff-Instruct written out: the same draws from one seeded generator, torch's per-tensor
    Adam, the gradient norm clipped by hand, λ(σ) = (σ² + σ_d²)/(σ σ_d)², ema ← β ema + (1 − β) θ. Loss ikl,
    or sid (gradients into x through both networks' inputs). With `config.reuse_pass` the fake step comes after
    the generator step, on its x_t and on the fake network's output that the generator loss read."""
    generator, teacher, fake = _networks()
    ema = copy.deepcopy(generator).requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=config.betas, foreach=False)
    opt_f = torch.optim.Adam(fake.parameters(), lr=config.fake_lr, betas=config.betas, foreach=False)
    rng = torch.Generator().manual_seed(config.seed)
    sampler, sd, b = make_sigma_sampler(config), teacher.sigma_data, config.batch

    def draw():
        z, c = generator.sample_latents(b, rng), generator.sample_labels(b, rng)
        return z, c, sampler(b, rng), torch.randn((b, 2), generator=rng)

    def step(loss, module, opt):  # the gradient of `loss` in `module`'s weights only
        params = list(module.parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for p, g in zip(params, grads):
            p.grad = g * min(1.0, config.grad_clip / (float(norm) + 1e-6))
        opt.step()

    def denoising(denoised, x, s):
        return ((s**2 + sd**2) / (s * sd) ** 2 * (denoised - x) ** 2).sum(1).mean()

    nimg = 0
    for _ in range(iterations):
        if not config.reuse_pass:
            z, c, sigma, noise = draw()
            with torch.no_grad():
                x = generator(z, c)
            s = sigma[:, None]
            step(denoising(fake(x + s * noise, sigma), x, s), fake, opt_f)
        z, c, sigma, noise = draw()
        x = generator(z, c)
        s = sigma[:, None]
        if config.loss == "sid":  # (D_r − D_f)ᵀ[(D_r − x) − α(D_r − D_f)] / sg[mean|x − D_r|], α = 1.2
            x_t = x + s * noise
            d_real, d_fake = teacher(x_t, sigma), fake(x_t, sigma)
            a = d_real - d_fake
            loss = (a * ((d_real - x) - 1.2 * a) / (x - d_real).detach().abs().mean(1, keepdim=True)).sum(1).mean()
        else:
            x_t = x.detach() + s * noise
            d_fake = fake(x_t, sigma)
            loss = ((d_fake - teacher(x_t, sigma)).detach() * x).sum(1).mean()
        step(loss, generator, opt_g)
        if config.reuse_pass:
            step(denoising(d_fake, x.detach(), s), fake, opt_f)
        half_life = min(config.ema * 1000, nimg * config.ema_rampup)
        beta = 0.5 ** (b / max(half_life, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), generator.parameters()):
                p_ema.copy_(beta * p_ema + (1 - beta) * p)
        nimg += b
    return {"generator": generator, "fake": fake, "ema": ema}


def _assert_close(trainer: Trainer, reference: dict[str, torch.nn.Module], atol: float = 1e-6) -> None:
    for name, module in reference.items():
        for (key, a), b in zip(getattr(trainer, name).state_dict().items(), module.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=f"{name}.{key}")


def test_the_iteration_equals_a_plain_implementation(tmp_path: Path):
    trainer = _trainer(tmp_path, CONFIG)
    assert all(group["fused"] for opt in (trainer.opt_g, trainer.opt_f) for group in opt.param_groups)
    _iterate(trainer, 4)
    reference = _plain(CONFIG, 4)
    _assert_close(trainer, reference)
    moved = [not torch.equal(a, b) for a, b in zip(trainer.generator.parameters(), _networks()[0].parameters())]
    assert all(moved)  # the comparison is not between untrained networks


@pytest.mark.parametrize("loss", ["ikl", "sid"])
@pytest.mark.parametrize("reuse_pass", [False, True])
def test_the_iteration_and_reuse_pass_equal_a_plain_implementation(tmp_path: Path, loss: str, reuse_pass: bool):
    config = TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "loss": loss, "reuse_pass": reuse_pass})
    trainer = _trainer(tmp_path, config)
    passes = []
    trainer.fake.register_forward_hook(lambda *args: passes.append(1))
    for _ in range(4):
        if not reuse_pass:
            trainer.fake_step()
        stats = trainer.generator_step()
        assert ("loss_fake" in stats) == reuse_pass
    assert trainer.counters.fake_steps == 4
    assert len(passes) == (4 if reuse_pass else 8)  # one fake-network pass per iteration serves both steps
    # sid's gradient passes through both networks: rounding differs by ~2e-6 after Adam (a lost or doubled
    # term would move the weights by ~lr = 3e-3)
    _assert_close(trainer, _plain(config, 4), atol=1e-6 if loss == "ikl" else 1e-5)


def test_an_iteration_with_reuse_pass_and_ratio_two_has_one_separate_fake_step(tmp_path: Path):
    trainer = _trainer(tmp_path, TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "ratio": 2,
                                                "reuse_pass": True}))
    fake, generator = trainer.iteration()
    assert "loss_gen" not in fake and {"loss_gen", "loss_fake", "grad_norm_fake"} <= set(generator)
    assert (trainer.counters.fake_steps, trainer.counters.step) == (2, 1)


def test_compile_gives_the_eager_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--compile runs the networks through torch.compile (here with the aot_eager backend: Dynamo's graphs
    and AOT autograd's backward without TorchInductor's C++ build, which takes minutes on CPU)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: compile_(module, backend="aot_eager"))
    torch._dynamo.reset()
    compiled = _trainer(tmp_path / "a", TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "compile": True}))
    assert set(compiled.compiled) == {"generator", "teacher", "fake"}
    _iterate(compiled, 3)
    assert all(c.compiled is not None for c in compiled.compiled.values())  # no fallback
    eager = _trainer(tmp_path / "b", CONFIG)
    _iterate(eager, 3)
    _assert_close(compiled, {"generator": eager.generator, "fake": eager.fake, "ema": eager.ema})


def test_a_failing_compile_warns_once_and_runs_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken(module):
        def call(*args, **kwargs):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    messages: list[str] = []
    config = TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "compile": True})
    compiled = _trainer(tmp_path / "a", config, echo=messages.append)
    _iterate(compiled, 2)
    assert len(messages) == 1 and "running it eagerly" in messages[0] and "CppCompileError" in messages[0]
    eager = _trainer(tmp_path / "b", CONFIG)
    _iterate(eager, 2)
    assert_same({k: v for k, v in compiled.state().items() if k != "config"},
                        {k: v for k, v in eager.state().items() if k != "config"})


def test_compile_without_a_cxx_compiler_warns_and_runs_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(loop.shutil, "which", lambda name: None)
    messages: list[str] = []
    trainer = _trainer(tmp_path, TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "compile": True}),
                       echo=messages.append)
    assert trainer.compiled == {} and len(messages) == 1 and "C++ compiler" in messages[0]


def test_reuse_images_trains_the_fake_on_the_generator_steps_images(tmp_path: Path):
    config = TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "reuse_images": True})
    trainer = _trainer(tmp_path, config)
    outputs: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    trainer.generator.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
    trainer.fake.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone())
                                           if m.training else None)  # the fake step's calls (train mode)
    trainer.fake_step()
    trainer.generator_step()
    assert len(outputs) == 2
    state = trainer.rng.get_state()
    trainer.fake_step()  # no generator call: x is the generator step's batch, x_t = x + σε with the next draws
    assert len(outputs) == 2
    rng = torch.Generator().set_state(state)
    sigma = make_sigma_sampler(config, "fake")(16, rng)
    torch.testing.assert_close(inputs[-1], outputs[1] + sigma[:, None] * torch.randn((16, 2), generator=rng))
    trainer.fake_step()  # the second fake step after it draws a new batch
    assert len(outputs) == 3


@pytest.mark.parametrize("option", ["reuse_images", "reuse_pass"])
def test_reuse_resumes_exactly(tmp_path: Path, option: str):
    config = TrainConfig(steps=6, batch=32, lr=1e-3, fake_lr=1e-3, ema=1.0, snapshot_every=3, log_every=3,
                         device="cpu", **{option: True})
    run_toy(config, tmp_path / "straight", samples=64)
    run_toy(TrainConfig(**{**config.to_json(), "betas": config.betas, "steps": 3}), tmp_path / "resumed", samples=64)
    run_toy(config, tmp_path / "resumed", samples=64, resume=True)
    a, b = (torch.load(tmp_path / r / "checkpoints" / "state-00000006.pt", weights_only=True)
            for r in ("straight", "resumed"))
    if option == "reuse_images":
        assert a["reused"]["x"].shape == (32, 2)
    else:
        assert "reused" not in a and a["counters"]["fake_steps"] == 6
    assert_same({k: v for k, v in a.items() if k != "config"}, {k: v for k, v in b.items() if k != "config"})


@pytest.mark.parametrize("given, message", [
    ({"loss": "sid"}, "--fake-sigma same"),  # sid draws the fake score's σ from lognormal, the generator's not
    ({"reuse_images": True}, "drop --reuse-images"),
    ({"augment": 0.12}, "--augment 0"),
    ({"loss": "dmd2", "fake_sigma": "same"}, "discriminator"),
])
def test_reuse_pass_refuses_what_it_cannot_share(given: dict, message: str):
    from common.errors import UserError
    from refiner.config import REFINE_DEFAULTS, resolve_config

    with pytest.raises(UserError, match=message):
        resolve_config(REFINE_DEFAULTS, {"reuse_pass": True, **given})
    config = resolve_config(REFINE_DEFAULTS, {"reuse_pass": True, "loss": "sid", "fake_sigma": "same"})
    assert config.reuse_pass and config.samplers() == {"generator": "karras-t", "fake": "karras-t"}


def test_the_options_reach_the_config_and_demo_has_them(tmp_path: Path):
    from click.testing import CliRunner

    from refiner.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["toy", "--out", str(out), "--steps", "2", "--batch", "8", "--samples", "50",
                                      "--reuse-images"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["toy", "--out", str(tmp_path / "pass"), "--steps", "2", "--batch", "8",
                                      "--samples", "50", "--reuse-pass"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["reuse_images"] is True and config["compile"] is False
    assert config["sources"]["reuse_images"] == "user"
    assert json.loads((tmp_path / "pass" / "config.json").read_text())["reuse_pass"] is True
    for command in ("toy", "refine", "distill", "demo"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        assert all(flag in text for flag in ("--reuse-images", "--reuse-pass", "--compile")), command


@pytest.mark.parametrize("reuse_pass", [False, True])
def test_the_generator_step_runs_the_generator_in_train_mode_whatever_mode_it_came_in(tmp_path: Path,
                                                                                      reuse_pass: bool):
    """Loaders hand over generators in eval mode. The official loop trains G in train mode (StyleGAN2's w_avg
    tracking, a one-step generator's dropout); the fake step samples it in eval mode. With --reuse-pass no fake
    step runs outside the generator step, so the mode must not depend on one having run (a resumed run had
    none)."""
    generator, teacher, fake = _networks()
    modes: list[bool] = []
    generator.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    config = TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "reuse_pass": reuse_pass})
    trainer = Trainer(config, generator.eval(), teacher, fake, RunDir(tmp_path / "run"), torch.device("cpu"),
                      echo=lambda s: None)
    trainer.iteration()
    trainer.iteration()
    assert modes == ([True, True] if reuse_pass else [False, True, False, True])  # fake step: eval; generator: train
    assert not trainer.ema.training


@pytest.mark.parametrize("teacher_mode", ["eval", "train-shared-dropout"])
def test_teacher_and_fake_run_in_their_modes_whole_however_their_submodules_came_in(tmp_path: Path,
                                                                                    teacher_mode: str):
    """The loop sets a network's mode once whole and afterwards only where its root is in the other mode
    (nn.Module.train walks every submodule). So networks handed in with submodules in another mode than their
    root must still run wholly in the loop's modes: the teacher in eval mode (train mode with the official
    recipe's shared dropout), the fake score in train mode in its step and like the teacher in the generator's."""
    generator, teacher, fake = _networks()
    teacher.net[0].train()  # root in eval mode, a submodule in train mode
    fake.train().net[0].eval()  # root in train mode, a submodule in eval mode
    calls: list[tuple[str, bool]] = []
    for name, network in (("teacher", teacher), ("fake", fake)):
        network.net[0].register_forward_pre_hook(lambda module, args, name=name: calls.append((name, module.training)))
    config = TrainConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "teacher_mode": teacher_mode})
    trainer = Trainer(config, generator, teacher, fake, RunDir(tmp_path / "run"), torch.device("cpu"),
                      echo=lambda s: None)
    trainer.iteration()
    trainer.iteration()
    shared = teacher_mode != "eval"
    step = [("fake", True), ("teacher", shared), ("fake", shared)]  # fake step, then the generator step's two calls
    assert calls == step + step
    assert not teacher.training and not any(m.training for m in teacher.modules())  # at rest: eval
