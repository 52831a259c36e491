"""EDM2 teachers against NVlabs/edm2's own outputs (tests/data/edm2-small.ref.pt, made in a scratch
area with the original training/networks_edm2.py: a 16 px, 10-class Precond with random weights stored
in float16, as EDM2 pickles store them; reference outputs from the original in float32)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import DATA, write_edm2_teacher
from metrics_helpers import StandInDetector

import refiner.cli.metrics as cli_metrics
from common.errors import UserError
from fileformats import nvpickle
from gan_adapters.loader import load_generator
from gan_adapters.onestep import OneStepGenerator
from refiner.cli import cli
from teachers.edm2 import MPConv, Precond, mp_cat, mp_sum, normalize
from teachers.edm_loader import load_teacher


@pytest.fixture(scope="module")
def ref():
    return torch.load(DATA / "edm2-small.ref.pt")


@pytest.fixture(scope="module")
def edm2_file(ref, tmp_path_factory):
    return write_edm2_teacher(tmp_path_factory.mktemp("edm2") / "edm2-small.pkl", ref)


def test_outputs_match_original(ref, edm2_file):
    teacher = load_teacher(edm2_file)
    assert isinstance(teacher.network, Precond)
    assert teacher.data_shape == (3, 16, 16) and teacher.label_dim == 10 and teacher.sigma_data == 0.5
    # stored in float16, computed in float32 like the original after .to(torch.float32)
    assert {t.dtype for t in nvpickle.load(edm2_file)["ema"].state_dict().values()} == {torch.float16}
    assert {p.dtype for p in teacher.network.state_dict().values()} == {torch.float32}
    with torch.no_grad():
        D = teacher(ref["x"], ref["sigma"], ref["labels"])
        D_logvar, logvar = teacher.network(ref["x"], ref["sigma"], ref["labels"], return_logvar=True)
        D_nolabel = teacher(ref["x_nolabel"], ref["sigma"])  # conditional net without labels: zero labels
    assert (D - ref["D"]).abs().max() < 1e-4
    assert torch.equal(D_logvar, D) and (logvar - ref["logvar"]).abs().max() < 1e-4 and logvar.shape == (4, 1, 1, 1)
    assert (D_nolabel - ref["D_nolabel"]).abs().max() < 1e-4
    assert ref["D"].abs().max() > 1  # the reference is not trivially small
    # StandardRGBEncoder: pixels = (x·127.5 + 128).clip(0, 255), x = pixels/127.5 − 1 (edm2 encoders.py)
    assert teacher.encoder.decode(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    assert teacher.encoder.encode(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_written_pickle_has_the_original_layout(ref, edm2_file):
    data = nvpickle.load(edm2_file)
    assert list(data) == ref["top_keys"] and isinstance(data, nvpickle.EasyDict)
    assert sorted(f"{m}.{n}" for m, n in nvpickle.globals_in(edm2_file)) == ref["globals"]
    assert set(data["ema"].state_dict()) == set(ref["state"])


def test_latent_teacher_is_refused(ref, tmp_path):
    path = write_edm2_teacher(tmp_path / "latent.pkl", ref, encoder="StabilityVAEEncoder")
    with pytest.raises(UserError, match="latent EDM2 teacher .*Stable Diffusion VAE"):
        load_teacher(path)


def test_edm2_as_generator_says_where_it_goes(edm2_file, monkeypatch):
    monkeypatch.setattr(cli_metrics, "_load_detector", lambda *args: StandInDetector())
    with pytest.raises(UserError, match="EDM2 diffusion model .*--teacher to refiner refine, distill or sample"):
        load_generator(edm2_file)
    result = CliRunner().invoke(cli, ["metrics", "--generator", str(edm2_file), "--metrics", "is20"])
    assert result.exit_code == 2 and "EDM2 diffusion model" in result.output and "Traceback" not in result.output


def test_sample_cli_and_inspect(edm2_file, tmp_path):
    result = CliRunner().invoke(cli, ["sample", "--teacher", str(edm2_file), "--seeds", "0-2", "--steps", "2",
                                      "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["x"].shape == (3, 16, 16, 3) and f["x"].std() > 0
    result = CliRunner().invoke(cli, ["inspect", str(edm2_file), "--depth", "0"])
    assert result.exit_code == 0, result.output
    assert "what it is: EDM2 pixel-space diffusion model (teacher)" in result.output
    assert "sample: yes, as --teacher" in result.output and "metrics: no" in result.output


def test_magnitude_preserving_operations():
    """EDM2 eqs. 66, 88, 103 in closed form: unit-RMS rows, and unit magnitude kept by mp_sum / mp_cat."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, 3, 3, generator=g) * 3
    rms = normalize(w).flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.ones(5), atol=1e-3)
    a, b = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    assert mp_sum(a, b, t=0.3).std().item() == pytest.approx(1, abs=0.01)
    assert torch.allclose(mp_sum(a, b, t=0.3), (0.7 * a + 0.3 * b) / math.sqrt(0.49 + 0.09), atol=1e-6)
    c = mp_cat(torch.ones(1, 3), torch.ones(1, 5), t=0.25)  # weights C/√N·(1−t), C/√N·t, C = √(8/(0.625))
    assert torch.allclose(c[0, :3], torch.full([3], math.sqrt(8 / 0.625) / math.sqrt(3) * 0.75))
    assert torch.allclose(c[0, 3:], torch.full([5], math.sqrt(8 / 0.625) / math.sqrt(5) * 0.25))


def test_training_mode_forces_weight_normalisation():
    """In training mode MPConv stores its normalised weight (EDM2 eq. 66, forced weight normalisation);
    a frozen (eval) teacher's weights are never touched."""
    conv = MPConv(4, 6, kernel=[3, 3])
    with torch.no_grad():
        conv.weight.mul_(5)
    before = conv.weight.clone()
    conv.eval()(torch.randn(1, 4, 5, 5))
    assert torch.equal(conv.weight, before)
    conv.train()(torch.randn(1, 4, 5, 5))
    assert torch.allclose(conv.weight.flatten(1).pow(2).mean(1).sqrt(), torch.ones(6), atol=1e-3)


def test_distilled_edm2_generator_round_trip(edm2_file, tmp_path):
    """A one-step generator made from an EDM2 teacher is saved in EDM2's layout (float16, as the teacher
    file) with refiner's metadata and loads back as a generator; an EDM2 file given as a generator with
    an explicit σ_init is read as one."""
    teacher = load_teacher(edm2_file)
    g = OneStepGenerator.from_teacher(teacher, sigma_init=2.5)
    g.save(tmp_path / "g.pkl")
    back = load_generator(tmp_path / "g.pkl")
    assert back.sigma_init == 2.5 and isinstance(back.network, Precond)
    z, c = torch.randn(2, 3, 16, 16), torch.eye(10)[[1, 2]]
    with torch.no_grad():
        assert torch.equal(back(z, c), g(z, c))  # the teacher's weights are float16 values already
        assert torch.equal(load_generator(edm2_file, sigma_init=2.5)(z, c), g(z, c))


def test_state_dict_as_teacher_says_where_it_goes(tmp_path):
    torch.save({"model.map_layer0.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="torch state dict .*--generator to refine or metrics"):
        load_teacher(tmp_path / "pytorch_model.bin")
