"""--loss, the loss options and the σ samplers on every training command: resolution order, refusals,
what config.json records, and the effect of the Karras range options on the σ the loop draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from refiner.cli import cli
from refiner.config import resolve_config
from refiner.loop import make_sigma_sampler
from refiner.rundir import RunDir
from refiner.toy import TOY_DEFAULTS
from teachers.sampler import karras_schedule

COMMANDS = {  # each training command with arguments that would fail late (missing files): a refusal must come first
    "toy": ["toy", "--steps", "1", "--batch", "8", "--samples", "20", "--fake-warmup", "0"],
    "refine": ["refine", "--generator", "missing.pkl", "--teacher", "missing.pkl", "--device", "cpu"],
    "distill": ["distill", "--teacher", "missing.pkl", "--device", "cpu"],
    # the demo's default loss is sid: give it the other commands' default (ikl) so that the same refusals apply;
    # a later --loss in the cases below wins
    "demo": ["demo", "--assets", "missing-assets", "--loss", "ikl"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_training_command_offers_the_losses_and_refuses_what_they_do_not_use(command: str, tmp_path: Path):
    runner = CliRunner()
    help_text = runner.invoke(cli, [command, "--help"]).output
    for option in ("--loss", "--alpha", "--huber-c", "--divergence", "--sigma", "--fake-sigma", "--t-max",
                   "--min-percent", "--p-mean"):
        assert option in help_text, (command, option)
    out = tmp_path / "run"
    for args, needles in [(["--loss", "sidd"], ["ikl, dmd, sid, sim, uni", "did you mean sid"]),
                          (["--alpha", "1.0"], ["--alpha", "loss sid", "--loss ikl"]),
                          (["--loss", "sid", "--huber-c", "0.1"], ["--huber-c", "loss sim"]),
                          (["--sigma", "karras", "--p-mean", "0"], ["--p-mean", "lognormal", "--sigma karras"]),
                          (["--loss", "sid", "--min-percent", "0.1"], ["--min-percent", "karras"]),
                          (["--loss", "uni", "--divergence", "kl"], ["--divergence must be one of rkl, fkl, js"]),
                          (["--loss", "sid", "--divergence", "fkl"], ["--divergence", "loss uni", "--loss sid"]),
                          (["--loss", "sid", "--alpha", "1", "--sigma", "karras", "--t-max", "500"], ["--t-max"])]:
        result = runner.invoke(cli, [*COMMANDS[command], "--out", str(out), *args])
        assert result.exit_code == 2, (command, args, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
        assert all(n in result.output for n in needles), (args, result.output)
        assert not out.exists()


def test_config_records_the_losses_defaults_user_values_and_their_sources(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "sid"
    result = runner.invoke(cli, [*COMMANDS["toy"], "--out", str(out), "--loss", "sid", "--t-max", "600"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["loss"], config["loss_options"], config["sigma"], config["t_max"], config["fake_sigma"],
            config["p_mean"], config["p_std"], config["loss_scale"]) == \
        ("sid", {"alpha": 1.2}, "karras-t", 600.0, "lognormal", -1.2, 1.2, 100.0)
    assert (config["sigma_min"], config["sigma_max"], config["rho"]) == (0.002, 80.0, 7.0)
    assert config["levels"] is None and config["min_percent"] is None  # the karras grid is not used
    sources = config["sources"]
    assert (sources["loss"], sources["t_max"], sources["sigma"], sources["loss_options.alpha"], sources["lr"],
            sources["rho"]) == ("user", "user", "loss sid", "loss sid", "default", "sampler karras-t")
    # the user's options win over the loss's defaults
    out = tmp_path / "sid2"
    result = runner.invoke(cli, [*COMMANDS["toy"], "--out", str(out), "--loss", "sid", "--alpha", "1.0",
                                 "--sigma", "lognormal", "--p-mean", "0.5"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["loss_options"], config["sigma"], config["p_mean"], config["t_max"]) == \
        ({"alpha": 1.0}, "lognormal", 0.5, None)


def test_karras_range_options_change_the_sigma_the_loop_draws(tmp_path: Path):
    grid = karras_schedule(1000).float()
    narrow = resolve_config(TOY_DEFAULTS, {"sigma": "karras", "min_percent": 0.5, "max_percent": 0.6})
    wide = resolve_config(TOY_DEFAULTS, {"sigma": "karras"})
    g = torch.Generator().manual_seed(0)
    drawn, everywhere = make_sigma_sampler(narrow)(4000, g), make_sigma_sampler(wide)(4000, g)
    assert set(drawn.tolist()) <= set(grid[499:600].tolist())
    assert float(everywhere.max()) > 10 * float(grid[499]) and float(everywhere.min()) < float(grid[600]) / 10
    # and in the loop itself: the generator steps' σ logged by a toy run lie in the range
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [*COMMANDS["toy"], "--steps", "4", "--log-every", "1", "--out", str(out),
                                      "--sigma", "karras", "--min-percent", "0.5", "--max-percent", "0.6"])
    assert result.exit_code == 0, result.output
    lo, hi = float(grid[600]) * (1 - 1e-6), float(grid[499]) * (1 + 1e-6)
    for record in RunDir(out).read_log():
        assert lo <= record["sigma_min"] <= record["sigma_max"] <= hi


def test_fake_sigma_same_keeps_one_sampler_and_a_named_one_splits_the_steps():
    config = resolve_config(TOY_DEFAULTS, {"loss": "sid"})
    assert config.samplers() == {"generator": "karras-t", "fake": "lognormal"}
    assert resolve_config(TOY_DEFAULTS, {}).samplers() == {"generator": "lognormal", "fake": "lognormal"}
    assert resolve_config(TOY_DEFAULTS, {"loss": "dmd"}).sampler_options() == \
        {"levels": 1000, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "min_percent": 0.02, "max_percent": 0.98}


@pytest.mark.parametrize("loss", ["dmd", "sid", "sim", "uni"])
def test_snapshots_of_every_loss_load_in_nvidias_layout(loss: str, tmp_path: Path):
    from fileformats import nvpickle
    from gan_adapters.loader import load_generator
    from gan_adapters.onestep import OneStepGenerator
    from tests.helpers import DATA

    out = tmp_path / loss
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(DATA / "edm-small-ddpmpp-edm-cond.pkl"), "--out",
                                      str(out), "--batch", "2", "--steps", "1", "--device", "cpu", "--grid-seeds", "2",
                                      "--loss", loss, "--lr", "1e-3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    snapshot = out / "network-snapshot-000000002.pkl"  # named by images seen: 1 step of 2
    assert set(nvpickle.load(snapshot)) == {"ema", "refiner"}
    generator = load_generator(snapshot)
    sigma_init = 1.0 if loss == "dmd" else 2.5  # SiD-family losses bring SiD's σ_init; dmd keeps the preset's
    assert isinstance(generator, OneStepGenerator) and generator.sigma_init == sigma_init
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == loss and config["extra"]["sigma_init"] == sigma_init
    assert all(torch.isfinite(torch.tensor(r["loss_gen"])) for r in RunDir(out).read_log())


def test_sid_presets_follow_run_sid_sh():
    from refiner.cli.distill import distill_config, resolve_sigma_init
    from refiner.cli.options import TRAINING_KEYS
    from refiner.presets import get_preset

    expected = {"cifar10-uncond-sid": (256, 1e-5, 500.0, "fp32", 500_000), "cifar10-cond-sid": (256, 1e-5, 500.0,
                                                                                                "fp32", 800_000),
                "imagenet64-cond-sid": (8192, 4e-6, 2000.0, "fp16", 1_000_000)}
    for name, (batch, lr, ema, precision, kimg) in expected.items():
        preset = get_preset(name)
        config = distill_config(preset, {k: None for k in TRAINING_KEYS}, None, None)
        assert (config.loss, config.batch, config.lr, config.fake_lr, config.betas, config.ema, config.precision) == \
            ("sid", batch, lr, lr, (0.0, 0.999), ema, precision), name
        assert config.steps == -(-kimg * 1000 // batch), name
        assert (config.loss_options, config.loss_scale, config.sigma, config.t_max, config.fake_sigma,
                config.p_mean, config.p_std) == ({"alpha": 1.2}, 100.0, "karras-t", 800.0, "lognormal", -1.2, 1.2)
        assert resolve_sigma_init(None, preset, config.loss) == (2.5, "loss sid")
        assert "run_sid.sh" in preset.source


def test_sigma_init_comes_from_the_user_then_the_loss_then_the_preset():
    from refiner.cli.distill import resolve_sigma_init
    from refiner.presets import get_preset

    assert resolve_sigma_init(None, get_preset("imagenet64-cond"), "ikl") == (2.5, "preset")
    assert resolve_sigma_init(None, get_preset("cifar10-cond"), "ikl") == (1.0, "preset")
    assert resolve_sigma_init(None, get_preset("cifar10-cond"), "uni") == (2.5, "loss uni")
    assert resolve_sigma_init(3.0, get_preset("cifar10-cond-sid"), "sid") == (3.0, "user")


def test_short_runs_start_sidas_adversarial_term_at_once_and_user_values_win():
    # refinement (from a trained GAN) and the demo (2.4-9.6 kimg) would never reach SiDA's 100 kimg; the presets
    # keep it (tests/test_adversarial_loop.py::test_adversarial_presets_follow_the_authors_scripts)
    from dataclasses import replace

    from refiner.config import REFINE_DEFAULTS, TrainConfig
    from refiner.demo.runner import JOBS

    for base in (REFINE_DEFAULTS, *JOBS.values()):
        config = resolve_config(base, {"loss": "sida"})
        assert config.loss_options["gan_start_kimg"] == 0.0 and config.sources["loss_options.gan_start_kimg"] == \
            "default"
        assert resolve_config(base, {"loss": "dmd2"}).loss_options == {"gan_weight": 3e-3, "disc_weight": 1e-2,
                                                                       "gan_levels": 1000}
        assert resolve_config(base, {"loss": "ikl"}).loss_options == {}
    user = resolve_config(REFINE_DEFAULTS, {"loss": "sida", "gan_start_kimg": 5.0})
    assert user.loss_options["gan_start_kimg"] == 5.0 and user.sources["loss_options.gan_start_kimg"] == "user"
    assert resolve_config(TrainConfig(), {"loss": "sida"}).loss_options["gan_start_kimg"] == 100.0
    # a checkpoint written before the job had these defaults still resumes (the effective options are compared)
    assert replace(user, loss_option_defaults={}).differences(user) == []
