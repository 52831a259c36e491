"""StyleGAN2-ADA snapshots behind the Generator interface: loading, options, training, writing back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from fileformats import nvpickle
from gan_adapters.base import Generator
from gan_adapters.loader import load_generator
from gan_adapters.stylegan2 import GeneratorConfig, StyleGAN2Network
from gan_adapters.stylegan2_adapter import (
    Snapshot,
    StyleGAN2Generator,
    StyleGAN2Options,
    load_stylegan2,
    stylegan2_from_snapshot,
)

DATA = Path(__file__).parent / "data"
PKL = DATA / "sg2ada-small-uncond.pkl"


@pytest.fixture(scope="module")
def ref():
    return torch.load(DATA / "sg2ada-small-uncond.ref.pt", weights_only=True)


def test_load_generator_recognises_the_snapshot(ref):
    G = load_generator(PKL, noise_mode="const")
    assert isinstance(G, StyleGAN2Generator) and isinstance(G, Generator)
    assert (G.z_dim, G.c_dim, G.data_shape, G.resolution, G.channels) == (64, 0, (3, 32, 32), 32, 3)
    assert not G.training
    with torch.no_grad():
        assert float((G(ref["z"]) - ref["img_const_psi1.0"]).abs().max()) <= 1e-4
        assert float((G(ref["z"], ref["c"]) - ref["img_const_psi1.0"]).abs().max()) <= 1e-4
    truncated = load_stylegan2(PKL, noise_mode="none", truncation_psi=0.7)
    with torch.no_grad():
        assert float((truncated(ref["z"]) - ref["img_none_psi0.7"]).abs().max()) <= 1e-4
    text = G.describe()
    assert "32x32x3" in text and "unconditional" in text and "architecture skip" in text and "263,987" in text


def test_sampling_priors():
    G = load_stylegan2(PKL)
    z1 = G.sample_latents(5, torch.Generator().manual_seed(3))
    z2 = G.sample_latents(5, torch.Generator().manual_seed(3))
    assert z1.shape == (5, 64) and torch.equal(z1, z2)
    assert G.sample_labels(5, torch.Generator()) is None
    assert G.options == StyleGAN2Options()  # noise 'random', no truncation, float32, all trainable


def test_url_source():
    G = load_generator(PKL.resolve().as_uri())
    assert G.snapshot.name.startswith("file://")


def test_conditional_generator_labels(ref):
    case = torch.load(DATA / "sg2ada-arch.ref.pt", weights_only=True)["resnet_cond_clamp"]
    network = StyleGAN2Network(GeneratorConfig.from_init_kwargs((), json.loads(case["init_kwargs"])))
    network.load_state_dict(case["state_dict"])
    G = StyleGAN2Generator(network.eval(), Snapshot({}, "memory"), StyleGAN2Options(force_fp32=True,
                                                                                      noise_mode="const"))
    labels = G.sample_labels(6, torch.Generator().manual_seed(0))
    assert labels.shape == (6, 5) and torch.equal(labels.sum(dim=1), torch.ones(6))
    with torch.no_grad():
        assert float((G(case["z"], case["c"]) - case["img_const_fp32"]).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="conditional"):
        G(case["z"])


def _grads(G, z):
    G.zero_grad(set_to_none=True)
    G(z).square().mean().backward()
    return {n: p.grad for n, p in G.network.named_parameters()}


def test_samples_are_differentiable_in_all_parameters():
    G = load_stylegan2(PKL).train()
    grads = _grads(G, torch.randn(2, 64))
    assert all(p.requires_grad for p in G.parameters())
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) == len(grads)
    # training mode with 'all' tracks w_avg, as StyleGAN2 training does
    before = G.network.mapping.w_avg.clone()
    with torch.no_grad():
        G(torch.randn(2, 64))
    assert not torch.equal(before, G.network.mapping.w_avg)


@pytest.mark.parametrize("mode", ["synthesis", "mapping-frozen"])
def test_freezing_modes(mode):
    G = load_stylegan2(PKL, trainable=mode).train()
    assert not G.network.mapping.training  # frozen mapping: eval mode, w_avg not tracked
    before = G.network.mapping.w_avg.clone()
    grads = _grads(G, torch.randn(2, 64))
    assert torch.equal(before, G.network.mapping.w_avg)
    for name, g in grads.items():
        frozen = name.startswith("mapping.") or (mode == "synthesis" and ".affine." in name)
        assert (g is None) == frozen, name
        assert G.network.get_parameter(name).requires_grad == (not frozen)
    trainable = {n for n, g in grads.items() if g is not None}
    assert "synthesis.b32.conv1.weight" in trainable and "synthesis.b4.const" in trainable
    assert ("synthesis.b4.conv1.affine.weight" in trainable) == (mode == "mapping-frozen")


def _perturbed(G: StyleGAN2Generator) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for t in G.network.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in G.network.state_dict().items()}


def _unchanged(a, b) -> bool:
    """Two loaded entries hold bit-identical data (records compared by tensors and plain state)."""
    if isinstance(a, nvpickle.PersistentObject):
        sa, sb = a.state_dict(), b.state_dict()
        return (a.class_name == b.class_name and a.module_src == b.module_src and list(sa) == list(sb)
                and all(torch.equal(sa[k], sb[k]) for k in sa) and a.init_kwargs == b.init_kwargs
                and type(a.init_kwargs.get("mapping_kwargs")) is type(b.init_kwargs.get("mapping_kwargs")))
    return a == b


@pytest.mark.parametrize("keep_G", [False, True])
def test_write_back_round_trip(tmp_path, ref, keep_G):
    original = nvpickle.load(PKL)
    G = load_stylegan2(PKL, noise_mode="const")
    refined = _perturbed(G)
    with torch.no_grad():
        images = G(ref["z"])
    out = tmp_path / "refined.pkl"
    G.save(out, keep_G=keep_G)

    again = nvpickle.load(out)
    assert list(again) == list(original)
    for key in ("G_ema",) + (() if keep_G else ("G",)):
        stored = again[key].state_dict()
        assert list(stored) == list(refined) and all(torch.equal(stored[k], refined[k]) for k in refined)
        assert again[key].init_kwargs == original[key].init_kwargs
    untouched = [k for k in original if k not in ("G_ema",) + (() if keep_G else ("G",))]
    assert "D" in untouched and "augment_pipe" in untouched and "training_set_kwargs" in untouched
    assert all(_unchanged(original[k], again[k]) for k in untouched)
    assert nvpickle.globals_in(out) == nvpickle.globals_in(PKL)
    assert nvpickle.pickle_protocol(out) == nvpickle.pickle_protocol(PKL)
    # the kept snapshot is left as read
    kept = G.snapshot.data["G_ema"].state_dict()
    assert all(torch.equal(kept[k], v) for k, v in original["G_ema"].state_dict().items())
    # our own loader reads the result and reproduces the refined images exactly
    with torch.no_grad():
        assert torch.equal(load_generator(out, noise_mode="const")(ref["z"]), images)


def test_unchanged_write_back_reproduces_the_file(tmp_path):
    out = tmp_path / "same.pkl"
    load_stylegan2(PKL).save(out, keep_G=True)
    assert out.read_bytes() == PKL.read_bytes()


def test_existing_output_is_refused_and_left_alone(tmp_path):
    G = load_stylegan2(PKL)
    out = tmp_path / "exists.pkl"
    out.write_bytes(b"user data")
    with pytest.raises(UserError, match="already exists"):
        G.save(out)
    assert out.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["exists.pkl"]


def test_ema_copy_shares_the_snapshot_and_the_discriminator_stays_on_cpu():
    G = load_stylegan2(PKL)
    ema = copy.deepcopy(G)
    assert ema.snapshot is G.snapshot and ema.network is not G.network
    G.to("meta")  # moves the network only
    assert G.network.synthesis.b4.const.device.type == "meta"
    assert all(t.device.type == "cpu" for t in G.snapshot.data["D"].state_dict().values())
    assert all(t.device.type == "cpu" for t in G.snapshot.data["G_ema"].state_dict().values())


def test_files_without_a_generator_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="EDM diffusion model.*--sigma-init"):
        load_generator(DATA / "edm-small-ddpmpp-edm-cond.pkl")
    with pytest.raises(UserError, match=r"no StyleGAN2-ADA/StyleGAN3 generator \(G_ema\).*EDMPrecond"):
        load_stylegan2(DATA / "edm-small-ncsnpp-edm-uncond.pkl")
    data = nvpickle.load(PKL)
    d_only = tmp_path / "d_only.pkl"
    nvpickle.dump({"D": data["D"]}, d_only)
    with pytest.raises(UserError, match="D: Discriminator"):
        load_generator(d_only)
    with pytest.raises(UserError, match="folder"):
        load_generator(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_generator(tmp_path / "missing.pkl")


@pytest.mark.parametrize("source, option, message", [
    (PKL, {"truncation": 0.5}, "StyleGAN3 network; --truncation applies to BigGAN-deep folders only"),
    (PKL, {"sigma_init": 2.5}, "; --sigma-init applies to one-step generators (EDM snapshots"),
    (DATA / "biggan-deep-small", {"sigma_init": 2.5, "trainable": "synthesis"},
     "is a BigGAN-deep folder; --sigma-init applies to one-step generators (EDM snapshots, DMD2 and consistency-model "
     "state dicts) only; --trainable applies to StyleGAN2-ADA and StyleGAN3 pickles only"),
])
def test_an_option_the_generator_does_not_take_is_named_as_the_command_line_names_it(source, option, message):
    with pytest.raises(UserError) as error:
        load_generator(source, **option)
    assert message in str(error.value)


@pytest.mark.parametrize("source, option, message", [
    (PKL, {"truncation_psi": "a"}, "truncation_psi must be a finite number (1 = no truncation), not 'a'"),
    (PKL, {"truncation_psi": float("nan")}, "truncation_psi must be a finite number"),
    (PKL, {"truncation_cutoff": -1}, "truncation_cutoff must be None or a layer count >= 0, not -1"),
    (PKL, {"force_fp32": "no"}, "force_fp32 must be True or False, not 'no'"),
    (PKL, {"device": "bogus"}, "unknown device 'bogus'; use auto, cpu, cuda or cuda:N"),
    (DATA / "edm-small-ddpmpp-edm-cond.pkl", {"sigma_init": float("inf")}, "sigma_init must be a finite number > 0"),
    (DATA / "edm-small-ddpmpp-edm-cond.pkl", {"sigma_init": "1"}, "sigma_init must be a finite number > 0 (got '1')"),
])
def test_python_api_values_the_command_line_would_refuse_are_refused_on_load(source, option, message):
    """load_generator takes what the command line's types check (finite floats, known devices) as plain
    arguments: each is checked when the generator is loaded, not when it is first called (sigma_init inf drew
    NaN images; truncation_psi 'a' failed inside the mapping network)."""
    with pytest.raises(UserError) as error:
        load_generator(source, **option)
    assert message in str(error.value)


def test_bad_options_and_mismatched_weights_are_user_errors():
    with pytest.raises(UserError, match="noise_mode"):
        load_stylegan2(PKL, noise_mode="fixed")
    with pytest.raises(UserError, match="trainable"):
        load_stylegan2(PKL, trainable="mapping")
    data = nvpickle.load(PKL)
    data["G_ema"].init_kwargs["synthesis_kwargs"]["channel_max"] = 32
    with pytest.raises(UserError, match="do not match"):
        stylegan2_from_snapshot(data, StyleGAN2Options(), "tampered.pkl")
    data["G_ema"].init_kwargs["synthesis_kwargs"]["magnitude_ema_beta"] = 0.5  # a StyleGAN3 argument
    with pytest.raises(UserError, match="StyleGAN3"):
        stylegan2_from_snapshot(data, StyleGAN2Options(), "tampered.pkl")
