"""`refiner distill`, its presets and the one-step generator, with the small EDM fixture as teacher
(EDMPrecond + DDPM++, 16x16, 10 classes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from common.errors import UserError
from fileformats import nvpickle
from gan_adapters.loader import load_generator
from gan_adapters.onestep import OneStepGenerator
from refiner.cli import cli
from refiner.presets import PRESETS, get_preset
from teachers.edm_loader import build_network, load_teacher
from tests.helpers import DATA

TEACHER = DATA / "edm-small-ddpmpp-edm-cond.pkl"


def _distill(out: Path, *args: str):
    return CliRunner().invoke(cli, ["distill", "--teacher", str(TEACHER), "--out", str(out), "--batch", "4",
                                    "--device", "cpu", "--grid-seeds", "4", "--log-every", "1", *args],
                              catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "run"
    result = _distill(out, "--preset", "cifar10-cond", "--steps", "2", "--lr", "1e-3", "--fake-lr", "1e-3")
    assert result.exit_code == 0, result.output
    return out


def _outputs(G, z, c) -> torch.Tensor:
    with torch.no_grad():
        return G.eval()(z, c)


def test_snapshot_holds_the_generator_in_the_teachers_layout(run: Path):
    snapshot = run / "network-snapshot-000000008.pkl"
    data, teacher = nvpickle.load(snapshot), nvpickle.load(TEACHER)
    assert set(data) == {"ema", "refiner"} and data["refiner"]["sigma_init"] == 1.0
    ema, original = data["ema"], teacher["ema"]
    assert (ema.class_name, ema.module_src, ema.init_kwargs) == (original.class_name, original.module_src,
                                                                 original.init_kwargs)
    assert nvpickle.globals_in(snapshot) <= nvpickle.globals_in(TEACHER)  # nothing NVIDIA's loader lacks
    # its tensors are the EMA of the last checkpoint, which moved away from the teacher
    state = torch.load(sorted((run / "checkpoints").iterdir())[-1], weights_only=True)
    written, trained = ema.state_dict(), {k.removeprefix("network."): v for k, v in state["ema"].items()}
    assert written.keys() == trained.keys() and all(torch.equal(written[k], trained[k]) for k in written)
    assert not all(torch.equal(written[k], v) for k, v in original.state_dict().items())
    # outputs: load_generator's == the raw network's D(σ·z; σ, c) == our generator holding the EMA
    G = load_generator(snapshot)
    assert isinstance(G, OneStepGenerator) and G.sigma_init == 1.0 and G.c_dim == 10
    assert load_generator(snapshot, sigma_init=1.0).sigma_init == 1.0  # the recorded value may be repeated
    with pytest.raises(UserError, match=r"records σ_init 1, the value it was trained at; --sigma-init 2.5 would"):
        load_generator(snapshot, sigma_init=2.5)
    with pytest.raises(UserError, match=r"a one-step generator written by refiner \(σ_init 1\), not a diffusion"):
        load_teacher(snapshot)  # the teacher's layout (EDM's own code builds it: `raw` below), but no denoiser
    rng = torch.Generator().manual_seed(1)
    z, c = G.sample_latents(3, rng), G.sample_labels(3, rng)
    with torch.no_grad():
        raw = build_network(ema)(z, torch.ones(3), c)
    ours = OneStepGenerator.from_teacher(load_teacher(TEACHER), 1.0)
    ours.load_state_dict(state["ema"])
    assert torch.equal(_outputs(G, z, c), raw)
    assert torch.equal(_outputs(ours, z, c), raw)


def test_run_writes_grids_log_report(run: Path):
    for name in ("grid-before.png", "grid-000000008.png", "grid-after.png", "report.html", "config.json"):
        assert (run / name).is_file(), name
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    extra = json.loads((run / "config.json").read_text())["extra"]
    assert (extra["preset"], extra["sigma_init"], extra["dropout"]) == ("cifar10-cond", 1.0, 0.13)


def test_presets_hold_the_published_values():
    di = get_preset("cifar10-uncond").train_config()
    assert (di.batch, di.lr, di.fake_lr, di.betas, di.ema, di.precision, di.loss, di.ratio) == \
        (128, 1e-5, 1e-5, (0.0, 0.999), 500.0, "fp32", "ikl", 1)
    assert di.steps == 200_000_000 // 128 and di.snapshot_every == 3907  # 200 Mimg; 500 kimg = 3906.25 steps
    assert (get_preset("cifar10-uncond").steps(0.004, batch=4), get_preset("cifar10-uncond").steps(0.0041, 4)) == (1, 2)
    sid = get_preset("imagenet64-cond")
    cfg = sid.train_config()
    assert (cfg.batch, cfg.lr, cfg.fake_lr, cfg.precision, cfg.ema, sid.sigma_init, sid.dropout) == \
        (8192, 4e-6, 4e-6, "fp16", 2000.0, 2.5, 0.10)
    assert get_preset("cifar10-cond").shape == (32, 10) and get_preset(None).precision == "auto"
    with pytest.raises(UserError, match="did you mean cifar10-cond"):
        get_preset("cifar10_cond")


def test_help_lists_presets_and_values():
    result = CliRunner().invoke(cli, ["distill", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.describe()}" in text
    assert "source: SiD run_sid.sh imagenet64-cond" in text


def test_command_line_overrides_every_preset_value(tmp_path: Path):
    out = tmp_path / "run"
    result = _distill(out, "--preset", "imagenet64-cond", "--kimg", "0", "--snapshot-kimg", "0",
                      "--lr", "2e-4", "--beta1", "0.5", "--ema", "1", "--precision", "fp32", "--sigma-init",
                      "0.5", "--dropout", "0", "--loss", "dmd", "--ratio", "2")
    assert result.exit_code == 0, result.output
    assert "preset imagenet64-cond is made for a 64x64 teacher with 1000 classes" in result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["batch"], config["steps"], config["snapshot_every"]) == (4, 0, 0)
    assert (config["lr"], config["fake_lr"], config["betas"], config["ema"]) == (2e-4, 4e-6, [0.5, 0.999], 1.0)
    assert (config["precision"], config["loss"], config["ratio"]) == ("fp32", "dmd", 2)
    assert (config["extra"]["sigma_init"], config["extra"]["dropout"]) == (0.5, 0.0)
    assert nvpickle.load(out / "network-snapshot-000000000.pkl")["refiner"]["sigma_init"] == 0.5


@pytest.mark.parametrize("args, needle", [
    (("--preset", "cifar10"), "unknown preset 'cifar10'"),
    (("--steps", "3", "--kimg", "1"), "--steps and --kimg both set the same length"),
    (("--dropout", "1.5"), "--dropout must lie in [0, 1)"),
])
def test_bad_options_are_one_line_errors_before_anything_is_written(tmp_path: Path, args, needle):
    out = tmp_path / "run"
    result = _distill(out, *args)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_diff_instruct_snapshot_without_metadata_needs_sigma_init(tmp_path: Path):
    record = nvpickle.load(TEACHER)["ema"]
    path = tmp_path / "network-snapshot-000500.pkl"
    nvpickle.dump({"ema": record, "Sg": record}, path)  # Diff-Instruct's layout: generator and fake score
    with pytest.raises(UserError, match=r"give --sigma-init \(1.0 for Diff-Instruct, 2.5 for SiD, 80 for DMD2"):
        load_generator(path)
    G = load_generator(path, sigma_init=2.5)
    rng = torch.Generator().manual_seed(2)
    z, c = G.sample_latents(2, rng), G.sample_labels(2, rng)
    with torch.no_grad():
        expected = build_network(record)(2.5 * z, torch.full([2], 2.5), c)
    assert torch.equal(_outputs(G, z, c), expected)
    with pytest.raises(UserError, match="one-step EDM generator; --noise-mode applies to StyleGAN2-ADA"):
        load_generator(path, sigma_init=1.0, noise_mode="const")
