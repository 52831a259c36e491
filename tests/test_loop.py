"""The training loop: exact resume after a hard kill, non-finite gradients, run-directory rules, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from click.testing import CliRunner

from gan_adapters.mlp import MLPGenerator
from refiner.cli import cli
from refiner.config import TrainConfig
from refiner.loop import Trainer
from refiner.rundir import RunDir
from refiner.toy import run_toy
from teachers.analytic import ring
from teachers.mlp import MLPDenoiser
from tests.helpers import assert_same

SMALL = TrainConfig(steps=12, batch=32, lr=1e-3, fake_lr=1e-3, ema=1.0, fake_warmup=3, log_every=2,
                    snapshot_every=6, device="cpu")



def test_resume_after_hard_kill_is_bit_exact(tmp_path: Path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_toy(SMALL, straight, samples=64)
    # The same run in a child process that SIGKILLs itself right after the step-6 checkpoint.
    script = textwrap.dedent(f"""
        import json, os, signal
        from refiner.toy import run_toy
        from refiner.config import TrainConfig
        cfg = TrainConfig.from_json(json.loads({json.dumps(SMALL.to_json())!r}))
        def die(trainer):
            if trainer.counters.step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        run_toy(cfg, {str(killed)!r}, samples=64, on_snapshot=(die,))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in RunDir(killed).checkpoints()] == ["state-00000006.pt"]
    run_toy(SMALL, killed, samples=64, resume=True)
    a = torch.load(straight / "checkpoints" / "state-00000012.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "state-00000012.pt", weights_only=True)
    assert_same(a, b)
    assert json.loads((straight / "toy.json").read_text()) == json.loads((killed / "toy.json").read_text())
    steps = [r["step"] for r in RunDir(killed).read_log()]
    assert steps == [r["step"] for r in RunDir(straight).read_log()] == [2, 4, 6, 8, 10, 12]


class _NaNTeacher(torch.nn.Module):
    """The ring teacher, returning NaN for every sample whose σ exceeds 2 (some batches have none)."""

    def __init__(self):
        super().__init__()
        self.inner = ring()
        self.sigma_data = self.inner.sigma_data

    def forward(self, x, sigma, labels=None):
        out = self.inner(x, sigma)
        return torch.where((sigma > 2.0)[:, None], torch.full_like(out, float("nan")), out)


def test_non_finite_teacher_never_reaches_the_weights(tmp_path: Path):
    config = TrainConfig(steps=30, batch=8, lr=1e-3, fake_lr=1e-3, log_every=5, device="cpu")
    run = RunDir(tmp_path / "run")
    run.prepare(config)
    messages: list[str] = []
    trainer = Trainer(config, MLPGenerator(), _NaNTeacher(), MLPDenoiser(sigma_data=0.7), run,
                      torch.device("cpu"), echo=messages.append)
    counters = trainer.train()
    assert 0 < counters.skipped_generator < 30
    assert counters.skipped_fake == 0
    for module in (trainer.generator, trainer.ema, trainer.fake):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    assert run.read_log()[-1]["skipped_generator"] == counters.skipped_generator
    assert any("non-finite" in m and "skipped" in m for m in messages)
    assert f"{counters.skipped_generator} generator" in messages[-1]


def _toy(runner: CliRunner, *args: str):
    return runner.invoke(cli, ["toy", "--steps", "2", "--batch", "8", "--samples", "50", "--fake-warmup", "0",
                               *args])


def test_bad_options_exit_2_with_one_line_and_touch_nothing(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "run"
    for args, needle in [(["--lr", "-1"], "--lr"), (["--ratio", "0"], "--ratio"), (["--batch", "0"], "--batch"),
                         (["--fake-lr", "0"], "--fake-lr"), (["--device", "tpu"], "--device"),
                         (["--bogus"], "No such option")]:
        result = _toy(runner, "--out", str(out), *args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output
        assert "Traceback" not in result.output
        assert not out.exists(), args


def test_noise_level_options_reach_the_config(tmp_path: Path):
    out = tmp_path / "run"
    result = _toy(CliRunner(), "--out", str(out), "--sigma", "lognormal", "--p-mean", "0", "--p-std", "0.8")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["sigma"], config["p_mean"], config["p_std"]) == ("lognormal", 0.0, 0.8)
    assert config["sources"]["p_mean"] == "user" and config["levels"] is None
    result = _toy(CliRunner(), "--out", str(tmp_path / "other"), "--sigma", "uniform")
    assert result.exit_code == 2 and "--sigma" in result.output and not (tmp_path / "other").exists()


def test_run_directory_rules(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert _toy(runner, "--out", str(out)).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = _toy(runner, "--out", str(out))
    assert result.exit_code == 2 and "--resume" in result.output and "--force" in result.output
    other = _toy(runner, "--out", str(out), "--resume", "--lr", "0.5")
    assert other.exit_code == 2 and "lr" in other.output and "another configuration" in other.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing changed on disk
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:")
    # --resume with more steps continues; --force starts over
    assert _toy(runner, "--out", str(out), "--resume", "--steps", "4").exit_code == 0
    assert [r["step"] for r in RunDir(out).read_log()][-1] == 4
    assert _toy(runner, "--out", str(out), "--force").exit_code == 0
    assert [r["step"] for r in RunDir(out).read_log()] == [2]


def test_toy_json_output(tmp_path: Path):
    result = _toy(CliRunner(), "--out", str(tmp_path / "r"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("energy_distance_before", "energy_distance_after", "noise_floor", "modes_covered", "modes_total"):
        assert key in data
    assert data["modes_total"] == 8
    assert (tmp_path / "r" / "toy.png").stat().st_size > 1000
    assert os.path.exists(tmp_path / "r" / "config.json")
