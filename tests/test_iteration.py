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
    Adam, the gradient norm clipped by hand, λ(σ) = (σ² + σ_d²)/(σ σ_d)², ema ← β ema + (1 − β) θ."""
    generator, teacher, fake = _networks()
    ema = copy.deepcopy(generator).requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=config.betas, foreach=False)
    opt_f = torch.optim.Adam(fake.parameters(), lr=config.fake_lr, betas=config.betas, foreach=False)
    rng = torch.Generator().manual_seed(config.seed)
    sampler, sd, b = make_sigma_sampler(config), teacher.sigma_data, config.batch

    def draw():
        z, c = generator.sample_latents(b, rng), generator.sample_labels(b, rng)
        return z, c, sampler(b, rng), torch.randn((b, 2), generator=rng)

    def step(loss, module, opt):
        opt.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in module.parameters()))
        for p in module.parameters():
            p.grad *= min(1.0, config.grad_clip / (float(norm) + 1e-6))
        opt.step()

    nimg = 0
    for _ in range(iterations):
        z, c, sigma, noise = draw()
        with torch.no_grad():
            x = generator(z, c)
        s = sigma[:, None]
        step(((s**2 + sd**2) / (s * sd) ** 2 * (fake(x + s * noise, sigma) - x) ** 2).sum(1).mean(), fake, opt_f)
        z, c, sigma, noise = draw()
        x = generator(z, c)
        x_t = x.detach() + sigma[:, None] * noise
        with torch.no_grad():
            g = fake(x_t, sigma) - teacher(x_t, sigma)
        step((g * x).sum(1).mean(), generator, opt_g)
        half_life = min(config.ema * 1000, nimg * config.ema_rampup)
        beta = 0.5 ** (b / max(half_life, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), generator.parameters()):
                p_ema.copy_(beta * p_ema + (1 - beta) * p)
        nimg += b
    return {"generator": generator, "fake": fake, "ema": ema}


def _assert_close(trainer: Trainer, reference: dict[str, torch.nn.Module]) -> None:
    for name, module in reference.items():
        for (key, a), b in zip(getattr(trainer, name).state_dict().items(), module.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_the_iteration_equals_a_plain_implementation(tmp_path: Path):
    trainer = _trainer(tmp_path, CONFIG)
    assert all(group["fused"] for opt in (trainer.opt_g, trainer.opt_f) for group in opt.param_groups)
    _iterate(trainer, 4)
    reference = _plain(CONFIG, 4)
    _assert_close(trainer, reference)
    moved = [not torch.equal(a, b) for a, b in zip(trainer.generator.parameters(), _networks()[0].parameters())]
    assert all(moved)  # the comparison is not between untrained networks


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


def test_reuse_images_resumes_exactly(tmp_path: Path):
    config = TrainConfig(steps=6, batch=32, lr=1e-3, fake_lr=1e-3, ema=1.0, snapshot_every=3, log_every=3,
                         reuse_images=True, device="cpu")
    run_toy(config, tmp_path / "straight", samples=64)
    run_toy(TrainConfig(**{**config.to_json(), "betas": config.betas, "steps": 3}), tmp_path / "resumed", samples=64)
    run_toy(config, tmp_path / "resumed", samples=64, resume=True)
    a, b = (torch.load(tmp_path / r / "checkpoints" / "state-00000006.pt", weights_only=True)
            for r in ("straight", "resumed"))
    assert a["reused"]["x"].shape == (32, 2)
    assert_same({k: v for k, v in a.items() if k != "config"}, {k: v for k, v in b.items() if k != "config"})


def test_the_options_reach_the_config_and_demo_has_them(tmp_path: Path):
    from click.testing import CliRunner

    from refiner.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["toy", "--out", str(out), "--steps", "2", "--batch", "8", "--samples", "50",
                                      "--reuse-images"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["reuse_images"] is True and config["compile"] is False
    assert config["sources"]["reuse_images"] == "user"
    for command in ("toy", "refine", "distill", "demo"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--reuse-images" in text and "--compile" in text, command
