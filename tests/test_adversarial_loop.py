"""The adversarial losses (dmd2, sida) in the loop: the discriminator head is trained, checkpointed and
resumed bit for bit; --data is required, checked against the teacher before anything is written; the
toy's target samples serve as real data and both losses learn the ring."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from fileformats import nvpickle
from refiner.cli import cli
from refiner.config import TrainConfig, resolve_config
from refiner.toy import run_toy
from tests.helpers import DATA

TEACHER = DATA / "edm-small-ddpmpp-edm-cond.pkl"  # 16x16, 10 classes
TOY = TrainConfig(steps=4, batch=64, lr=2e-3, fake_lr=2e-3, betas=(0.0, 0.99), ema=1.0, fake_warmup=2,
                  log_every=1, device="cpu")


def _toy_config(loss: str, **given) -> TrainConfig:
    return resolve_config(TOY, {"loss": loss, **given})


def _zip_dataset(path: Path, labels: tuple[int, ...] = (0, 1, 2, 3, 4, 9), size: int = 32) -> Path:
    n = len(labels)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    names = [f"img{i:08d}.png" for i in range(n)]
    with zipfile.ZipFile(path, "w") as z:
        for name, img in zip(names, images):
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[name, c] for name, c in zip(names, labels)]}))
    return path


def _distill(out: Path, *args: str):
    return CliRunner().invoke(cli, ["distill", "--teacher", str(TEACHER), "--out", str(out), "--batch", "2",
                                    "--device", "cpu", "--grid-seeds", "2", "--log-every", "1", "--lr", "1e-3",
                                    "--fake-lr", "1e-3", *args])


@pytest.mark.parametrize("loss", ["dmd2", "sida"])
def test_loss_defaults_are_the_authors(loss):
    config = _toy_config(loss)
    if loss == "dmd2":
        assert (config.ratio, config.grad_clip, config.betas) == (5, 10.0, (0.9, 0.999))
        assert (config.sigma, config.levels, config.min_percent, config.max_percent) == ("karras", 1000, 0.02, 0.98)
        assert (config.fake_sigma, config.t_max) == ("karras-t", 1000.0)  # DMD2's fake loss: all 1000 levels
        assert config.loss_options == {"gan_weight": 3e-3, "disc_weight": 1e-2, "gan_levels": 1000}
    else:
        assert (config.sigma, config.t_max, config.fake_sigma, config.loss_scale) == ("karras-t", 800.0,
                                                                                      "lognormal", 100.0)
        assert config.loss_options == {"alpha": 1.0, "gan_weight": 1e-4, "disc_weight": 1.0, "gan_start_kimg": 100.0}


@pytest.mark.parametrize("loss", ["dmd2", "sida", "uni"])
def test_head_is_checkpointed_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, loss):
    own = {"sida": {"gan_start_kimg": 0.0}, "uni": {"divergence": "fkl"}}.get(loss, {})
    config = _toy_config(loss, ratio=2, **own)
    run_toy(config, tmp_path / "straight", samples=32)
    run_toy(replace(config, steps=2), tmp_path / "resumed", samples=32)
    run_toy(config, tmp_path / "resumed", samples=32, resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "state-00000004.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "state-00000004.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in ("generator", "fake", "ema", "adversary"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a["rng"]["loop"], b["rng"]["loop"])
    first = torch.load(tmp_path / "resumed" / "checkpoints" / "state-00000002.pt", weights_only=True)
    if loss == "dmd2":  # the head trains with the fake network (its parameters are in the fake optimiser)
        assert a["adversary"] and not all(torch.equal(a["adversary"][k], first["adversary"][k]) for k in a["adversary"])
        fake_params = [k for k in a["fake"] if k != "freqs"]  # the toy MLP's one buffer is not a parameter
        assert len(a["opt_f"]["param_groups"][0]["params"]) == len(fake_params) + len(a["adversary"])
    else:
        assert a["adversary"] == {}  # SiDA's logits are the channel mean: no parameters
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    # uni: the discriminator only estimates the density ratio (no generator term)
    generator_term = "log_ratio" if loss == "uni" else "loss_gan"
    assert all("loss_disc" in r and generator_term in r for r in log)


@pytest.mark.parametrize("loss", ["dmd2", "sida"])
def test_toy_learns_the_ring_with_target_samples_as_real_data(tmp_path, loss):
    # dmd2 with DMD2's Adam β1 0.9 oscillates at the toy's learning rate; the toy's β1 0 learns the ring
    given = {"ratio": 1, "fake_warmup": 20}
    config = (_toy_config(loss, steps=40, batch=256, gan_start_kimg=0.0, **given) if loss == "sida"
              else _toy_config(loss, steps=30, batch=128, beta1=0.0, **given))
    result = run_toy(config, tmp_path / loss, samples=500)
    assert result.energy_distance_after < result.energy_distance_before / 5, result


def test_distill_without_data_refuses_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = _distill(out, "--loss", "dmd2", "--steps", "1")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "Error: --loss dmd2 trains a discriminator on real images: give them with --data (an image folder, a "
        "dataset .zip with dataset.json labels, or an .npz of uint8 images)"]
    assert not out.exists()
    data = str(_zip_dataset(tmp_path / "d.zip"))
    for loss in (["--loss", "ikl"], ["--loss", "uni"]):
        result = _distill(out, *loss, "--steps", "1", "--data", data)
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            f"Error: --data is read by the losses that train a discriminator (dmd2, sida, uni --divergence fkl|js) "
            f"only and this run uses {' '.join(loss)}; drop --data or choose one of them"]
        assert not out.exists()
    # uni's forward KL and JS members weigh by a density ratio: a discriminator trained on real images
    result = _distill(out, "--loss", "uni", "--divergence", "js", "--steps", "1")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "Error: --loss uni with --divergence js trains a discriminator on real images: give them with --data (an "
        "image folder, a dataset .zip with dataset.json labels, or an .npz of uint8 images)"]
    assert not out.exists()


@pytest.mark.parametrize("make, needle", [
    (lambda p: np.savez(p / "d.npz", x=np.zeros((2, 24, 24, 3), np.uint8)), "cannot be area-downsampled"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((2, 16, 16, 3), np.uint8)), "conditional (10 classes) but the data"),
    (lambda p: _zip_dataset(p / "d.zip", labels=(0, 1, 12)), "labels range over 0..12 but the teacher has 10"),
    (lambda p: (p / "d.npz").write_bytes(b"garbage"), "not an .npz file"),
])
@pytest.mark.parametrize("loss", [["--loss", "sida"], ["--loss", "uni", "--divergence", "fkl"]], ids=["sida", "uni"])
def test_unreadable_or_mismatched_data_exits_2_with_one_line_and_nothing_written(tmp_path, make, needle, loss):
    make(tmp_path)
    data = tmp_path / ("d.zip" if (tmp_path / "d.zip").exists() else "d.npz")
    out = tmp_path / "run"
    result = _distill(out, *loss, "--steps", "1", "--data", str(data))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert not out.exists()


def test_distill_with_dmd2_trains_the_head_and_keeps_nvidias_layout(tmp_path):
    out = tmp_path / "run"
    data = _zip_dataset(tmp_path / "d.zip")  # 32x32 images, area-downsampled to the teacher's 16x16
    result = _distill(out, "--loss", "dmd2", "--steps", "2", "--ratio", "1", "--data", str(data))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["extra"]["data"] == str(data) and config["extra"]["sigma_init"] == 80.0
    state = torch.load(out / "checkpoints" / "state-00000002.pt", weights_only=True)
    assert {k.split(".")[0] for k in state["adversary"]} == {"head"}
    snapshot = nvpickle.load(out / "network-snapshot-000000004.pkl")  # named by images seen: 2 steps of 2
    assert set(snapshot) == {"ema", "refiner"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite([r["loss_disc"], r["loss_gan"], r["loss_gen"]]).all() for r in log)


def test_refine_with_sida_keeps_the_rest_of_the_stylegan2_pickle(tmp_path):
    from tests.helpers import write_edm_teacher

    sg2 = DATA / "sg2ada-small-uncond.pkl"
    teacher = write_edm_teacher(tmp_path / "edm32.pkl")  # 32x32, unconditional, like the GAN
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["refine", "--generator", str(sg2), "--teacher", str(teacher), "--out", str(out),
                                      "--loss", "sida", "--gan-start-kimg", "0", "--data", str(data), "--steps", "2",
                                      "--batch", "2", "--lr", "1e-3", "--device", "cpu", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    before, after = nvpickle.load(sg2), nvpickle.load(out / "network-refined.pkl")
    changed = [k for k, v in before["G_ema"].state_dict().items() if not torch.equal(v, after["G_ema"].state_dict()[k])]
    assert changed
    a, b = before["D"].state_dict(), after["D"].state_dict()  # G takes the refined weights too (no --keep-G)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert after["training_set_kwargs"] == before["training_set_kwargs"]
    assert nvpickle.globals_in(out / "network-refined.pkl") == nvpickle.globals_in(sg2)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("loss_gan" in r and np.isfinite(r["loss_gan"]) for r in log)


@pytest.mark.parametrize("name, expected", [
    # tianweiy/DMD2 experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh
    ("imagenet64-cond-dmd2", dict(loss="dmd2", batch=7 * 40, lr=2e-6, fake_lr=2e-6, ratio=5, grad_clip=10.0,
                                  betas=(0.9, 0.999), ema=0.0, precision="bf16", fake_warmup=0, steps=40_000,
                                  loss_options={"gan_weight": 3e-3, "disc_weight": 1e-2, "gan_levels": 1000})),
    # mingyuanzhou/SiD branch sida, run_sida.sh cifar10-uncond and sida_training_loop.py (100 kimg warm-up)
    ("cifar10-uncond-sida", dict(loss="sida", batch=256, lr=1e-5, fake_lr=1e-5, ratio=1, betas=(0.0, 0.999),
                                 ema=500.0, precision="fp32", fake_warmup=391, loss_scale=100.0,
                                 loss_options={"alpha": 1.0, "gan_weight": 1e-4, "disc_weight": 1.0,
                                               "gan_start_kimg": 100.0})),
    ("imagenet64-cond-sida", dict(loss="sida", batch=8192, lr=4e-6, fake_lr=4e-6, ema=2000.0, precision="fp16",
                                  fake_warmup=13)),
])
def test_adversarial_presets_follow_the_authors_scripts(name, expected):
    from refiner.cli.distill import distill_config, resolve_sigma_init
    from refiner.cli.options import TRAINING_KEYS
    from refiner.presets import get_preset

    preset = get_preset(name)
    config = distill_config(preset, dict.fromkeys(TRAINING_KEYS), None, None)
    assert {k: getattr(config, k) for k in expected} == expected
    assert resolve_sigma_init(None, preset, config.loss)[0] == (80.0 if "dmd2" in name else 2.5)


def test_augmented_fake_step_with_a_discriminator(tmp_path):
    """--augment beside an adversarial loss: the augmentation's draws and the discriminator's are separate
    (they once shared a name, and the discriminator got the augmentation parameters)."""
    out = tmp_path / "run"
    result = _distill(out, "--loss", "dmd2", "--steps", "1", "--ratio", "1", "--augment", "0.5",
                      "--data", str(_zip_dataset(tmp_path / "d.zip")))
    assert result.exit_code == 0, result.output
    state = torch.load(out / "checkpoints" / "state-00000001.pt", weights_only=True)
    assert state["config"]["augment"] == 0.5 and {k.split(".")[0] for k in state["adversary"]} == {"head"}



def test_refine_refuses_missing_unreadable_or_unused_data_with_one_line_and_writes_nothing(tmp_path):
    from tests.helpers import write_edm_teacher

    teacher = write_edm_teacher(tmp_path / "edm32.pkl")  # 32x32, unconditional, like the GAN
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "small.npz", x=np.zeros((2, 24, 24, 3), np.uint8))  # below the teacher's 32x32
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 32, 32, 3), np.uint8))
    out = tmp_path / "run"
    for args, needle in [
        (["--loss", "uni", "--divergence", "fkl"], "--loss uni with --divergence fkl trains a discriminator"),
        (["--loss", "sida", "--data", str(tmp_path / "bad.npz")], "not an .npz file"),
        (["--loss", "uni", "--divergence", "js", "--data", str(tmp_path / "small.npz")], "cannot be area-downsampled"),
        (["--loss", "sid", "--data", str(tmp_path / "ok.npz")], "--data is read by the losses that train a"),
    ]:
        result = CliRunner().invoke(cli, ["refine", "--generator", str(DATA / "sg2ada-small-uncond.pkl"), "--teacher",
                                          str(teacher), "--out", str(out), "--steps", "1", "--batch", "2",
                                          "--device", "cpu", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], (args, result.output)
        assert not out.exists()
