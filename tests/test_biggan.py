"""BigGAN-deep adapter against the golden fixture written by pytorch-pretrained-biggan 0.1.1."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from scipy import stats

from common.errors import UserError
from gan_adapters.base import Generator
from gan_adapters.biggan import (
    BigGANGenerator,
    load_biggan,
    stat_weights,
    truncated_noise,
)
from gan_adapters.resize import Resized, area_downsample

FOLDER = "biggan-deep-small"


@pytest.fixture(scope="module")
def ref():
    return torch.load(Path(__file__).parent / "data" / f"{FOLDER}.ref.pt", weights_only=True)


@pytest.fixture
def gen(data_dir) -> BigGANGenerator:
    return load_biggan(data_dir / FOLDER)


def file_state(folder):
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("truncation", [0.4, 1.0, 0.655, 0.5])
def test_golden_images(gen, ref, truncation):
    z = ref[f"z_t{truncation}"]
    assert torch.equal(z, truncation * ref["z_unit"])
    with torch.no_grad():
        img = gen.network(z, ref["class_label"], truncation)
    assert img.shape == (4, 3, 32, 32)
    assert (img - ref[f"img_t{truncation}"]).abs().max().item() <= 1e-5


def test_adapter_call_uses_its_truncation(data_dir, ref):
    g = load_biggan(data_dir / FOLDER, truncation=0.655)
    with torch.no_grad():
        img = g(ref["z_t0.655"], ref["class_label"])
    assert (img - ref["img_t0.655"]).abs().max().item() <= 1e-5


def test_embedding_and_stored_uv_sigma(gen, ref):
    with torch.no_grad():
        assert (gen.network.embeddings(ref["class_label"]) - ref["embed"]).abs().max().item() <= 1e-6
        sigma = gen.network.generator.gen_z.sigma()
    assert sigma.item() == pytest.approx(ref["gen_z_sigma_from_uv"].item(), rel=1e-6)
    # The stored u, v are deliberately off: the true spectral norm differs by a few percent.
    assert abs(sigma.item() / ref["gen_z_true_sigma"].item() - 1) > 0.01


def test_stat_weights_quirk():
    assert stat_weights(0.4, 51) == (20, 1.0, 0.0)
    assert stat_weights(1.0, 51) == (50, 1.0, 0.0)
    idx, w_lo, w_hi = stat_weights(0.655, 51)
    assert idx == 32 and w_lo == pytest.approx(0.75) and w_hi == pytest.approx(0.25)


def test_state_dict_equals_file(gen, ref, data_dir):
    theirs = file_state(data_dir / FOLDER)
    ours = gen.network.state_dict()
    assert len(theirs) == ref["n_state_dict_entries"] == 314
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert sum(p.numel() for p in gen.network.parameters()) == ref["n_params"]


def test_adapter_protocol_and_gradients(gen):
    assert isinstance(gen, Generator)
    assert (gen.z_dim, gen.c_dim, gen.data_shape, gen.resolution) == (32, 10, (3, 32, 32), 32)
    g = torch.Generator().manual_seed(3)
    z, c = gen.sample_latents(5, g), gen.sample_labels(5, g)
    assert z.shape == (5, 32) and c.shape == (5, 10)
    assert torch.equal(c.sum(1), torch.ones(5)) and set(c.unique().tolist()) == {0.0, 1.0}
    img = gen(z, c)
    assert img.shape == (5, 3, 32, 32) and img.abs().max() <= 1
    img.square().mean().backward()
    net = gen.network
    for p in (net.embeddings.weight, net.generator.gen_z.weight_orig, net.generator.layers[4].gamma,
              net.generator.bn.weight, net.generator.conv_to_rgb.weight_orig):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not net.generator.gen_z.weight_u.requires_grad
    assert not net.generator.bn.running_means.requires_grad
    with pytest.raises(UserError, match="class-conditional"):
        gen(z)


def test_prior_truncated_normal():
    t = 0.7
    a = truncated_noise(4000, 32, t, torch.Generator().manual_seed(1))
    b = truncated_noise(4000, 32, t, torch.Generator().manual_seed(1))
    c = truncated_noise(4000, 32, t, torch.Generator().manual_seed(2))
    assert a.dtype == torch.float32 and a.shape == (4000, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max().item() <= 2 * t
    assert a.abs().max().item() > 1.95 * t  # the tails are reached
    # Distribution: N(0, 1) restricted to [-2, 2], scaled by t (Kolmogorov-Smirnov against scipy's truncnorm).
    x = (a / t).flatten().double().numpy()
    assert stats.kstest(x, stats.truncnorm(-2, 2).cdf).pvalue > 0.01
    # Closed-form variance of the standard normal truncated to [-2, 2]: 1 - 2·2·phi(2) / (2·Phi(2) - 1).
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    var = 1 - 4 * phi2 / math.erf(2 / math.sqrt(2))
    assert x.var() == pytest.approx(var, rel=0.02)


def test_save_reload_roundtrip(gen, ref, data_dir, tmp_path):
    with torch.no_grad():  # as after refinement: weights differ from the input file
        for p in gen.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "refined"
    gen.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refined"]  # no temporary leftovers
    assert (out / "config.json").read_bytes() == (data_dir / FOLDER / "config.json").read_bytes()
    assert not zipfile.is_zipfile(out / "pytorch_model.bin")  # legacy non-zip torch.save, like the input
    saved, original = file_state(out), file_state(data_dir / FOLDER)
    assert list(saved) == list(original)
    assert saved._metadata == original._metadata
    ours = gen.network.state_dict()
    assert all(torch.equal(saved[k], ours[k]) for k in saved)
    assert not torch.equal(saved["generator.gen_z.weight_orig"], original["generator.gen_z.weight_orig"])

    again = load_biggan(out)
    z, c = ref["z_t0.5"], ref["class_label"]
    with torch.no_grad():
        assert torch.equal(again.network(z, c, 0.5), gen.network(z, c, 0.5))

    before = (out / "pytorch_model.bin").read_bytes()
    with pytest.raises(UserError, match="already holds"):
        again.save(out)
    assert (out / "pytorch_model.bin").read_bytes() == before
    load_biggan(data_dir / FOLDER).save(out, overwrite=True)
    key = "generator.gen_z.weight_orig"
    assert torch.equal(file_state(out)[key], original[key])


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["missing", "empty", "no_config", "not_biggan_config", "wrong_keys",
                                  "wrong_shapes", "not_state_dict", "file"])
def test_not_a_biggan_folder(case, data_dir, tmp_path):
    folder = tmp_path / "model"
    expect = {"missing": "not a folder", "file": "not a folder", "empty": "config.json and pytorch_model.bin",
              "no_config": "config.json missing", "not_biggan_config": "not a BigGAN-deep config",
              "wrong_keys": "entries missing", "wrong_shapes": "shapes", "not_state_dict": "not a state_dict"}
    if case == "file":
        folder.write_text("x")
    elif case == "empty":
        folder.mkdir()
    elif case != "missing":
        copy_folder(data_dir / FOLDER, folder)
    if case == "no_config":
        (folder / "config.json").unlink()
    elif case == "not_biggan_config":
        (folder / "config.json").write_text(json.dumps({"z_dim": 512, "w_dim": 512}))
    elif case == "wrong_keys":
        torch.save({"mapping.fc0.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    elif case == "wrong_shapes":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "channel_width": 16}))
    elif case == "not_state_dict":
        torch.save([1, 2, 3], folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=expect[case]):
        load_biggan(folder)


def test_bad_truncation(data_dir):
    with pytest.raises(UserError, match="truncation"):
        load_biggan(data_dir / FOLDER, truncation=1.5)


def test_area_downsample_by_hand():
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    y = area_downsample(x, 2)
    # channel 0 top-left block: (0 + 1 + 4 + 5) / 4; channel 1 bottom-right: (26 + 27 + 30 + 31) / 4
    assert y.shape == (1, 2, 2, 2)
    assert y[0, 0, 0, 0].item() == 2.5 and y[0, 1, 1, 1].item() == 28.5
    assert torch.equal(y[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert torch.equal(area_downsample(x, 1), torch.full((1, 2, 1, 1), 0.0) + x.mean((2, 3), keepdim=True))
    assert area_downsample(x, 4) is x
    for size in (3, 8, 0):
        with pytest.raises(UserError, match="whole multiple"):
            area_downsample(x, size)


def test_resized_wrapper(gen, tmp_path):
    small = Resized(gen, 16)
    assert isinstance(small, Generator)
    assert (small.z_dim, small.c_dim, small.data_shape) == (32, 10, (3, 16, 16))
    g = torch.Generator().manual_seed(0)
    z, c = small.sample_latents(2, g), small.sample_labels(2, g)
    img = small(z, c)
    assert torch.allclose(img, torch.nn.functional.avg_pool2d(gen(z, c), 2))
    img.sum().backward()
    assert gen.network.generator.gen_z.weight_orig.grad.abs().sum() > 0
    small.save(tmp_path / "out")
    assert load_biggan(tmp_path / "out").data_shape == (3, 32, 32)
    with pytest.raises(UserError, match="whole multiple"):
        Resized(gen, 24)


def test_saved_weights_are_the_same_bytes_every_time(tmp_path):
    """torch's legacy writer names storages by memory address; ours numbers them, so two saves of the same
    weights are byte-identical (and torch.load reads them as torch's own)."""
    import io

    from fileformats.torchfiles import save_legacy

    def weights() -> dict[str, torch.Tensor]:  # the same values in freshly allocated storages
        return {"a": torch.arange(4.0), "b": torch.ones(3, dtype=torch.float16), "view": torch.zeros(2, 2)[1]}

    state = weights()
    first, second, theirs = io.BytesIO(), io.BytesIO(), io.BytesIO()
    save_legacy(state, first)
    save_legacy(weights(), second)
    torch.save(state, theirs, _use_new_zipfile_serialization=False)
    assert first.getvalue() == second.getvalue()
    assert first.getvalue()[:12] == theirs.getvalue()[:12]  # the same magic number and protocol
    for data in (first, theirs):
        loaded = torch.load(io.BytesIO(data.getvalue()), weights_only=True)
        assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())


def test_sample_refuses_a_biggan_folder_and_points_to_the_commands_that_take_it(data_dir, tmp_path):
    from click.testing import CliRunner

    from refiner.cli import cli

    result = CliRunner().invoke(cli, ["sample", "--teacher", str(data_dir / FOLDER), "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "BigGAN-deep folder" in result.output and "refiner metrics" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()
