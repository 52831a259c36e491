"""Pickles written by NVlabs/stylegan3 (its StyleGAN2 config, StyleGAN3-T, StyleGAN3-R) against the outputs of
that code: loading, outputs, write-back, refinement, and the numpy arrays these pickles carry.

tests/data/sg3-*.pkl are snapshots made by NVlabs/stylegan3's own code with every module source replaced
by a placeholder; sg3-*.ref.pt hold the inputs and the original's outputs (scripts/make_stylegan3_ref.py,
float32 on CPU, where NVIDIA's code runs its reference implementations of the custom ops).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from common.errors import UserError
from fileformats import nvpickle
from gan_adapters.loader import load_generator
from gan_adapters.stylegan2 import SG2ADA_REPO, SG3_REPO, GeneratorConfig
from gan_adapters.stylegan2_adapter import STYLEGAN3, build_network, stylegan_kind
from gan_adapters.stylegan3 import StyleGAN3Config, StyleGAN3Network
from refiner.cli import cli
from tests.helpers import DATA, write_edm_teacher

CASES = {"sg3-stylegan2-cond": SG3_REPO, "sg3-t-uncond": STYLEGAN3, "sg3-r-cond": STYLEGAN3}
DESCRIBED = {"sg3-stylegan2-cond": "StyleGAN2 (NVlabs/stylegan3) generator", "sg3-t-uncond": "StyleGAN3-T",
             "sg3-r-cond": "StyleGAN3-R"}


def _pkl(case: str) -> Path:
    return DATA / f"{case}.pkl"


def _ref(case: str) -> dict:
    return torch.load(DATA / f"{case}.ref.pt", weights_only=True)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", CASES)
def test_outputs_match_the_original(case):
    data, ref = nvpickle.load(_pkl(case)), _ref(case)
    assert stylegan_kind(data["G_ema"]) == CASES[case]
    G = build_network(data["G_ema"])
    stored = data["G_ema"].state_dict()
    assert [(k, v.shape) for k, v in G.state_dict().items()] == [(k, v.shape) for k, v in stored.items()]
    assert sum(p.numel() for p in G.parameters()) == ref["n_params_G_ema"] and G.num_ws == ref["num_ws"]
    G.load_state_dict(stored)
    G.eval()
    with torch.no_grad():
        assert _maxdiff(G.mapping(ref["z"], ref["c"]), ref["ws"]) <= 1e-5
        assert _maxdiff(G(ref["z"], ref["c"], noise_mode="const", force_fp32=True), ref["img_const"]) <= 1e-4
        truncated = G(ref["z"], ref["c"], truncation_psi=0.6, truncation_cutoff=3, noise_mode="none",
                      force_fp32=True)
        assert _maxdiff(truncated, ref["img_none_psi0.6_cutoff3"]) <= 1e-4
        non_ema = build_network(data["G"])
        non_ema.load_state_dict(data["G"].state_dict())
        assert _maxdiff(non_ema.eval()(ref["z"], ref["c"], noise_mode="const"), ref["G_img_const"]) <= 1e-4
    assert _maxdiff(ref["G_img_const"], ref["img_const"]) > 1e-3  # G and G_ema differ


@pytest.mark.parametrize("case", ["sg3-t-uncond", "sg3-r-cond"])
def test_designed_filters_and_layer_schedule_equal_the_stored_ones(case):
    """Built from its kwargs alone (no weights loaded), the network has the file's filters, sizes and
    sampling attributes: the schedule and the filter design are those of the original."""
    record = nvpickle.load(_pkl(case))["G_ema"]
    G = StyleGAN3Network(StyleGAN3Config.from_init_kwargs(record.init_args, record.init_kwargs))
    stored = record.state_dict()
    for key, mine in G.state_dict().items():
        if key.endswith(("up_filter", "down_filter")):
            assert _maxdiff(mine, stored[key]) <= 1e-7, key
    layers = nvpickle.node_children(record.children()["synthesis"])
    assert list(layers)[1:] == G.synthesis.layer_names
    radial = 0
    for name, layer in zip(G.synthesis.layer_names, G.synthesis.layers()):
        state = layers[name].state
        assert layer.padding == state["padding"] and layer.up_factor == state["up_factor"], name
        assert layer.down_factor == state["down_factor"] and layer.use_fp16 == state["use_fp16"], name
        assert isinstance(state["in_size"], np.ndarray) and state["in_size"].tolist() == [layer.spec.in_size] * 2
        assert layer.spec.in_cutoff == state["in_cutoff"] and layer.spec.out_half_width == state["out_half_width"]
        radial += layer.down_filter is not None and layer.down_filter.ndim == 2
    assert (radial > 0) == (case == "sg3-r-cond")


def test_stylegan3_repo_stylegan2_config_uses_that_repos_defaults():
    """NVlabs/stylegan3 passes the synthesis kwargs flat and defaults to float16 blocks and clamping; the
    stored layers (what the original's forward reads) say which."""
    data = nvpickle.load(_pkl("sg3-stylegan2-cond"))
    record = data["G_ema"]
    assert "synthesis_kwargs" not in record.init_kwargs and "num_fp16_res" not in record.init_kwargs
    G = build_network(record)
    assert G.cfg.repo == SG3_REPO and G.cfg.mapping.w_avg_beta == record.children()["mapping"].state["w_avg_beta"]
    blocks = nvpickle.node_children(record.children()["synthesis"])
    for block in G.synthesis.blocks():
        state = blocks[f"b{block.resolution}"].state
        assert block.use_fp16 == state["use_fp16"]
        assert block.conv1.conv_clamp == state["_modules"]["conv1"].state["conv_clamp"] == 256
    assert [b.use_fp16 for b in G.synthesis.blocks()] == [False, True, True, True]
    # on the CPU the original computes its float16 blocks in float32: so does this one, unless on CUDA
    ref = _ref("sg3-stylegan2-cond")
    G.load_state_dict(record.state_dict())
    with torch.no_grad():
        assert _maxdiff(G.eval()(ref["z"], ref["c"], noise_mode="const", force_fp32=False), ref["img_const"]) <= 1e-4
    assert stylegan_kind(nvpickle.load(DATA / "sg2ada-small-uncond.pkl")["G_ema"]) == SG2ADA_REPO


@pytest.mark.parametrize("case", CASES)
def test_load_generator_and_describe(case):
    ref = _ref(case)
    G = load_generator(_pkl(case), noise_mode="const")
    assert (G.z_dim, G.c_dim, G.data_shape) == (16, ref["c"].shape[1], (3, 32, 32))
    with torch.no_grad():
        assert _maxdiff(G(ref["z"], ref["c"] if G.c_dim else None), ref["img_const"]) <= 1e-4
    assert DESCRIBED[case] in G.describe()


@pytest.mark.parametrize("case", ["sg3-t-uncond", "sg3-r-cond"])
def test_write_back_changes_only_the_generators(tmp_path, case):
    original = nvpickle.load(_pkl(case))
    G = load_generator(_pkl(case), noise_mode="const")
    unchanged = tmp_path / "same.pkl"
    G.save(unchanged, keep_G=True)
    assert unchanged.read_bytes() == _pkl(case).read_bytes()

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in G.network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    refined = {k: v.clone() for k, v in G.network.state_dict().items()}
    out = tmp_path / "refined.pkl"
    G.save(out)
    again = nvpickle.load(out)
    assert list(again) == list(original)
    for key in ("G_ema", "G"):
        stored = again[key].state_dict()
        assert list(stored) == list(refined) and all(torch.equal(stored[k], refined[k]) for k in refined)
        assert again[key].init_kwargs == original[key].init_kwargs
    layer = nvpickle.node_children(again["G_ema"].children()["synthesis"])[G.network.synthesis.layer_names[0]]
    assert layer.state["in_size"].dtype == np.int64  # the numpy attributes are written back as arrays
    d_old, d_new = original["D"].state_dict(), again["D"].state_dict()
    assert list(d_old) == list(d_new) and all(torch.equal(d_old[k], d_new[k]) for k in d_old)
    assert again["training_set_kwargs"] == original["training_set_kwargs"] and again["augment_pipe"] is None
    assert nvpickle.globals_in(out) == nvpickle.globals_in(_pkl(case))
    with torch.no_grad():
        ref = _ref(case)
        c = ref["c"] if G.c_dim else None
        assert torch.equal(load_generator(out, noise_mode="const")(ref["z"], c), G(ref["z"], c))


def test_refine_two_steps_in_place(tmp_path):
    gen = tmp_path / "sg3.pkl"
    shutil.copy(_pkl("sg3-t-uncond"), gen)
    teacher = write_edm_teacher(tmp_path / "edm32.pkl")
    result = CliRunner().invoke(cli, [
        "refine", "--generator", str(gen), "--teacher", str(teacher), "--out", str(tmp_path / "run"),
        "--steps", "2", "--batch", "2", "--device", "cpu", "--lr", "1e-3", "--in-place"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sg3.pkl.bak").read_bytes() == _pkl("sg3-t-uncond").read_bytes()
    before, after = nvpickle.load(_pkl("sg3-t-uncond")), nvpickle.load(gen)
    old, new = before["G_ema"].state_dict(), after["G_ema"].state_dict()
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("synthesis.L"))
    assert all(torch.equal(old[k], new[k]) for k in old if k.endswith(("filter", "magnitude_ema", "freqs")))
    d_old, d_new = before["D"].state_dict(), after["D"].state_dict()
    assert all(torch.equal(d_old[k], d_new[k]) for k in d_old)
    with torch.no_grad():
        assert load_generator(gen)(torch.randn(2, 16)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("command", [["sample", "--out", "o"], ["distill", "--out", "o"]])
def test_a_gan_given_as_teacher_says_what_it_is_and_which_command_takes_it(tmp_path, command):
    result = CliRunner().invoke(cli, [command[0], "--teacher", str(_pkl("sg3-r-cond")), *command[1:-1],
                                      str(tmp_path / command[-1])])
    assert result.exit_code == 2, result.output
    assert "StyleGAN3-R snapshot" in result.output and "--generator of `refiner refine`" in result.output


def test_inspect_names_the_generator_and_the_commands():
    result = CliRunner().invoke(cli, ["inspect", str(_pkl("sg3-r-cond")), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["usage"]["kind"] == "StyleGAN3-R network snapshot (G_ema)"
    assert "--generator" in summary["usage"]["commands"]["refine"]
    assert summary["usage"]["commands"]["distill"].startswith("no:")
    assert "numpy.ndarray" in summary["globals"]
    text = CliRunner().invoke(cli, ["inspect", str(_pkl("sg3-stylegan2-cond")), "--depth", "0"]).output
    assert "what it is: StyleGAN2 (NVlabs/stylegan3) network snapshot (G_ema)" in text
    assert "metrics: yes, as --generator" in text


# ---------------------------------------------------------------------------------------------------
# numpy arrays in the restricted reader


class _Array:
    """Pickles as numpy does for an ndarray, with a chosen __setstate__ argument."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return np.zeros(1).__reduce__()[0], (np.ndarray, (0,), b"b"), self.state


def test_plain_arrays_load_and_round_trip():
    data = {"size": np.broadcast_to(np.asarray(20), [2]), "f": np.linspace(0, 1, 5, dtype=np.float32),
            "m": np.eye(2, dtype=np.uint8).T}
    raw = pickle.dumps(data, protocol=4)
    loaded = nvpickle.load(raw)
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in data.items())
    assert nvpickle.dumps(loaded, numpy_scalar_module="numpy._core.multiarray") == raw
    # without a source file to follow, arrays are written under the name every numpy version imports
    assert ("numpy.core.multiarray", "_reconstruct") in nvpickle.globals_in(nvpickle.dumps(loaded))


@pytest.mark.parametrize("state, needle", [
    ((1, (2,), np.dtype(object), False, [1, "a"]), "dtype object"),
    ((1, (1,), np.dtype([("a", "<i4")]), False, b"\0" * 4), "structured dtype"),
    ((1, (10 ** 9,), np.dtype("<f4"), False, b""), "shape [1000000000]"),
    ((1, (3,), np.dtype("<f4"), False, b"\0" * 4), "needs 12 bytes"),
])
def test_unsafe_or_malformed_arrays_are_refused(state, needle):
    with pytest.raises(UserError, match="refused|malformed") as err:
        nvpickle.load(pickle.dumps({"x": _Array(state)}, protocol=4))
    assert needle in str(err.value)


def test_object_array_written_by_numpy_is_refused():
    with pytest.raises(UserError, match="dtype object"):
        nvpickle.load(pickle.dumps(np.array([1, None], dtype=object), protocol=4))


def test_config_round_trips_in_each_repositorys_layout():
    record = nvpickle.load(_pkl("sg3-stylegan2-cond"))["G_ema"]
    cfg = build_network(record).cfg
    flat = cfg.to_init_kwargs()
    assert "synthesis_kwargs" not in flat and flat["fused_modconv_default"] == "inference_only"
    assert {k: flat[k] for k in record.init_kwargs if k != "mapping_kwargs"} == \
        {k: v for k, v in record.init_kwargs.items() if k != "mapping_kwargs"}
    assert GeneratorConfig.from_init_kwargs((), flat, repo=SG3_REPO) == cfg
    nested = GeneratorConfig(**{**cfg.__dict__, "repo": SG2ADA_REPO}).to_init_kwargs()
    assert "fused_modconv_default" not in nested["synthesis_kwargs"]  # not a stylegan2-ada-pytorch argument
    with pytest.raises(ValueError, match="fused_modconv_default"):
        GeneratorConfig.from_init_kwargs((), {**nested, "synthesis_kwargs": {"fused_modconv_default": True}})


def test_filtered_lrelu_without_filters_is_bias_lrelu_gain_clamp():
    from gan_adapters.stylegan2_ops import filtered_lrelu

    x = torch.tensor([[[[-2.0, -0.5], [0.5, 3.0]]]])
    y = filtered_lrelu(x, b=torch.tensor([1.0]), gain=2.0, slope=0.25, clamp=5.0)
    assert torch.equal(y, torch.tensor([[[[-0.5, 1.0], [3.0, 5.0]]]]))  # (x + 1) -> lrelu · 2 -> clamp
    # 2x up with a [1, 1] box filter repeats pixels (zero insertion, gain up²); down 2 keeps every other one
    up = filtered_lrelu(x, fu=torch.tensor([0.5, 0.5]), up=2, padding=[1, 0, 1, 0], gain=1.0, slope=1.0)
    assert torch.allclose(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert torch.equal(filtered_lrelu(up, down=2, gain=1.0, slope=1.0), x)


def test_input_gain_is_the_same_in_the_fused_and_the_unfused_modulated_convolution():
    from gan_adapters.stylegan2_ops import modulated_conv2d

    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    styles, gain = torch.randn(2, 3, generator=g), torch.tensor(0.7)
    fused = modulated_conv2d(x, weight, styles, padding=2, input_gain=gain)
    unfused = modulated_conv2d(x, weight, styles, padding=2, input_gain=gain, fused_modconv=False)
    assert torch.allclose(fused, unfused, atol=1e-5)
    # a scalar gain scales the demodulated output (demodulation does not see it)
    assert torch.allclose(fused, modulated_conv2d(x, weight, styles, padding=2) * 0.7, atol=1e-5)
