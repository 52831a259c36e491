"""Clean-room EDM networks against the golden fixtures (outputs of NVIDIA's code), published
parameter counts/shapes (docs/pickle_formats.md §3), and hand-written preconditioning formulas."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fileformats import nvpickle
from teachers.edm_layers import skip_init
from teachers.edm_loader import build_network
from teachers.edm_precond import EDMPrecond, VEPrecond, VPPrecond, edm_coefficients, iDDPMPrecond
from teachers.edm_unets import DhariwalUNet, SongUNet

FIXTURES = ["edm-small-ddpmpp-edm-cond", "edm-small-ncsnpp-edm-uncond"]


DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    name = request.param
    record = nvpickle.load(DATA / f"{name}.pkl")["ema"]
    ref = torch.load(DATA / f"{name}.ref.pt", weights_only=True)
    return SimpleNamespace(record=record, net=build_network(record), ref=ref)


def assert_per_sample(out: torch.Tensor, ref: torch.Tensor, sigma: torch.Tensor, tol: float = 1e-4) -> None:
    """max |out − ref| ≤ tol·max(1, σ_i) for every sample i."""
    err = (out.double() - ref.double()).abs().flatten(1).amax(1)
    limit = tol * sigma.double().clamp(min=1)
    assert (err <= limit).all(), f"errors {err.tolist()} exceed {limit.tolist()}"


def test_state_dict_names_shapes_and_values(fixture):
    stored = fixture.record.state_dict()
    ours = fixture.net.state_dict()
    assert list(ours) == list(stored)
    for key in stored:
        assert ours[key].shape == stored[key].shape, key
        assert torch.equal(ours[key], stored[key]), key
    assert sum(p.numel() for p in fixture.net.parameters()) == fixture.ref["n_params"]


def test_attributes(fixture):
    ref, net = fixture.ref, fixture.net
    assert net.label_dim == ref["label_dim"]
    assert net.sigma_min == float(ref["sigma_min"]) and net.sigma_max == float(ref["sigma_max"])
    assert torch.equal(net.round_sigma(ref["sigma"]), ref["round_sigma"])


def test_denoiser_outputs(fixture):
    ref, net = fixture.ref, fixture.net
    x, sigma, labels, aug = ref["x"], ref["sigma"], ref.get("class_labels"), ref["augment_labels"]
    seen = {}

    def hook(module, args, kwargs, out):
        seen.update(x=args[0], noise=args[1], out=out)

    handle = net.model.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            D = net(x, sigma, labels, force_fp32=True, augment_labels=aug)
            inner = dict(seen)
            D_default = net(x, sigma, labels, augment_labels=aug)
            D_noaug = net(x, sigma, labels)
            D_f64 = net(x.double(), sigma.double(), labels)
    finally:
        handle.remove()
    assert_per_sample(D, ref["D"], sigma)
    assert_per_sample(D_default, ref["D_default"], sigma)
    assert_per_sample(D_noaug, ref["D_noaug"], sigma)
    assert_per_sample(D_f64, ref["D_float64_inputs_noaug"], sigma)
    assert D_f64.dtype == torch.float32
    assert (inner["out"] - ref["model_out"]).abs().max() <= 5e-5
    assert (inner["x"] - ref["model_in_x"]).abs().max() <= 1e-6
    assert (inner["noise"] - ref["model_in_noise_labels"]).abs().max() <= 1e-6
    # Augment labels must matter, otherwise the D vs D_noaug checks would not test map_augment.
    assert (ref["D"] - ref["D_noaug"]).abs().max() > 1e-3
    if labels is not None:
        with torch.no_grad():
            D_nolabels = net(x, sigma)
        assert_per_sample(D_nolabels, ref["D_nolabels_noaug"], sigma)
        assert (ref["D_nolabels_noaug"] - ref["D_noaug"]).abs().max() > 1e-3


# --- Full-size configurations: parameter counts and shapes measured on NVIDIA's code (docs/pickle_formats.md §3) ---

def shapes_of(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_cifar10_ddpmpp_and_ncsnpp_parameter_counts():
    common = dict(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9, model_channels=128,
                  channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)
    with skip_init():
        ddpmpp = SongUNet(label_dim=0, **common)
        ncsnpp = SongUNet(label_dim=10, embedding_type="fourier", channel_mult_noise=2,
                          encoder_type="residual", resample_filter=[1, 3, 3, 1], **common)
    assert sum(p.numel() for p in ddpmpp.parameters()) == 55_733_891
    assert sum(p.numel() for p in ncsnpp.parameters()) == 56_400_643
    shapes = shapes_of(ddpmpp)
    assert shapes["map_augment.weight"] == (128, 9) and "map_augment.bias" not in shapes
    assert shapes["enc.32x32_block0.skip.weight"] == (256, 128, 1, 1)
    assert shapes["enc.16x16_down.skip.resample_filter"] == (1, 1, 2, 2)
    assert shapes["enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1)
    assert shapes["dec.32x32_block4.conv0.weight"] == (256, 384, 3, 3)
    assert shapes["dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    assert "dec.16x16_block3.qkv.weight" not in shapes and "dec.16x16_block4.qkv.weight" in shapes
    shapes = shapes_of(ncsnpp)
    assert shapes["map_noise.freqs"] == (128,) and shapes["map_label.weight"] == (256, 10)
    assert shapes["enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)
    assert shapes["enc.8x8_aux_residual.resample_filter"] == (1, 1, 4, 4)


def test_imagenet64_adm_parameter_count_and_shapes():
    with skip_init():
        net = EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True,
                         model_type="DhariwalUNet", dropout=0.10)
    assert sum(p.numel() for p in net.parameters()) == 295_899_267
    shapes = shapes_of(net)
    assert shapes["model.map_layer0.weight"] == (768, 192)
    assert shapes["model.map_label.weight"] == (768, 1000) and "model.map_label.bias" not in shapes
    assert shapes["model.enc.64x64_conv.weight"] == (192, 3, 3, 3)
    assert shapes["model.enc.32x32_block0.affine.weight"] == (768, 768)
    assert shapes["model.enc.32x32_block0.qkv.weight"] == (1152, 384, 1, 1)
    assert shapes["model.out_conv.weight"] == (3, 192, 3, 3)
    # Down/up blocks without a channel change have a resample-only skip (kernel 0).
    assert "model.enc.32x32_down.skip.weight" not in shapes
    assert shapes["model.enc.32x32_down.skip.resample_filter"] == (1, 1, 2, 2)
    assert net.model.enc["32x32_block0"].num_heads == 6 and net.model.enc["8x8_block0"].num_heads == 12


# --- Variants without fixtures: forward shapes ---

@pytest.mark.parametrize("encoder_type,decoder_type",
                         [("skip", "skip"), ("standard", "skip"), ("skip", "standard")])
def test_songunet_skip_variants(encoder_type, decoder_type):
    net = SongUNet(8, 2, 3, label_dim=4, augment_dim=2, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[4], embedding_type="fourier", channel_mult_noise=2,
                   encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=[1, 3, 3, 1]).eval()
    keys = shapes_of(net)
    assert ("enc.4x4_aux_down.resample_filter" in keys) == (encoder_type == "skip")
    if encoder_type == "skip":
        assert "enc.4x4_aux_down.weight" not in keys and keys["enc.4x4_aux_skip.weight"] == (8, 2, 1, 1)
    assert ("dec.4x4_aux_conv.weight" in keys) == (decoder_type == "skip")
    assert ("dec.8x8_aux_up.resample_filter" in keys) == (decoder_type == "skip")
    out = net(torch.randn(2, 2, 8, 8), torch.randn(2), torch.eye(4)[:2], torch.randn(2, 2))
    assert out.shape == (2, 3, 8, 8) and out.isfinite().all()


def test_dhariwal_unet_forward_and_label_effect():
    net = DhariwalUNet(8, 3, 6, label_dim=5, augment_dim=2, model_channels=64, channel_mult=[1, 2],
                       num_blocks=1, attn_resolutions=[4]).eval()
    for p in net.parameters():  # zero-initialised output layers would make the output constant
        p.data.add_(0.05 * torch.randn_like(p))
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    out = net(x, noise, torch.eye(5)[:2])
    assert out.shape == (2, 6, 8, 8) and out.isfinite().all()
    assert (out - net(x, noise, torch.eye(5)[2:4])).abs().max() > 1e-4


def test_init_statistics():
    """Fresh layers follow their init modes: xavier_uniform bound √(6/(fan_in+fan_out)), zero biases,
    kaiming-normal label embedding × √label_dim (std 1), conv1 of ADM blocks exactly zero."""
    song = SongUNet(8, 3, 3, model_channels=64, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    w = song.map_layer1.weight
    assert w.abs().max() <= math.sqrt(6 / (256 + 256)) and w.abs().max() > 0.9 * math.sqrt(6 / 512)
    assert (song.map_layer1.bias == 0).all()
    adm = DhariwalUNet(8, 3, 3, label_dim=400, model_channels=64, channel_mult=[1], num_blocks=1,
                       attn_resolutions=[])
    assert abs(float(adm.map_label.weight.detach().std()) - 1.0) < 0.02
    assert (adm.enc["8x8_block0"].conv1.weight == 0).all() and (adm.out_conv.weight == 0).all()


# --- Preconditioning formulas (EDM Table 1) with a stub inner model ---

class StubModel(nn.Module):
    """Records its inputs and returns a fixed F (channels as asked)."""

    def __init__(self, F: torch.Tensor):
        super().__init__()
        self.F = F

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = (x, noise_labels, class_labels, augment_labels)
        return self.F


def with_stub(cls, out_channels: int = 3, **kwargs):
    with skip_init():
        net = cls(img_resolution=4, img_channels=3, label_dim=2, model_channels=8, channel_mult=[1],
                  num_blocks=1, attn_resolutions=[], **kwargs)
    F = torch.randn(5, out_channels, 4, 4)
    net.model = StubModel(F)
    return net, F


SIGMAS = np.array([0.003, 0.05, 0.7, 9.0, 75.0])


def expected(name: str, s: np.ndarray) -> tuple:
    """(c_skip, c_out, c_in, c_noise) written out by hand from EDM Table 1."""
    if name == "EDM":
        sd = 0.5
        norm = np.sqrt(s**2 + sd**2)
        return sd**2 / norm**2, s * sd / norm, 1 / norm, np.log(s) / 4
    if name == "VP":
        t = (np.sqrt(0.1**2 + 2 * 19.9 * np.log(1 + s**2)) - 0.1) / 19.9
        return np.ones_like(s), -s, 1 / np.sqrt(s**2 + 1), 999 * t
    if name == "VE":
        return np.ones_like(s), s, np.ones_like(s), np.log(s / 2)
    raise ValueError(name)


@pytest.mark.parametrize("name,cls", [("EDM", EDMPrecond), ("VP", VPPrecond), ("VE", VEPrecond)])
def test_preconditioning_closed_forms(name, cls):
    net, F = with_stub(cls, model_type="SongUNet")
    x = torch.randn(5, 3, 4, 4)
    labels = torch.eye(2)[[0, 1, 1, 0, 1]]
    D = net(x, torch.tensor(SIGMAS), labels, augment_labels="aug").double()
    c_skip, c_out, c_in, c_noise = (torch.tensor(c).reshape(-1, 1, 1, 1) for c in expected(name, SIGMAS))
    seen_x, seen_noise, seen_labels, seen_aug = net.model.seen
    torch.testing.assert_close(seen_x.double(), c_in * x.double(), rtol=1e-5, atol=1e-6)
    # VP: like the original, ln(1 + σ²) is evaluated in float32, which loses ~1e-3 at σ = 0.003.
    atol = 1e-3 if name == "VP" else 1e-5
    torch.testing.assert_close(seen_noise.double(), c_noise.flatten(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(D, c_skip * x.double() + c_out * F.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(seen_labels, labels) and seen_aug == "aug"
    net(x, torch.tensor(SIGMAS))  # missing labels of a conditional network: all zeros
    assert torch.equal(net.model.seen[2], torch.zeros(1, 2))


def test_vp_noise_range():
    net, _ = with_stub(VPPrecond)
    assert net.sigma_min == 2.0**-10  # σ(1e-5) evaluated in float32, as NVIDIA's code stores it
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-6)
    t = torch.tensor([1e-3, 0.3, 1.0])
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t, rtol=1e-4, atol=1e-6)


def iddpm_u(M=1000, C_1=0.001, C_2=0.008) -> np.ndarray:
    alpha_bar = np.sin(0.5 * np.pi * np.arange(M + 1) / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C_1) - 1)
    return u


def test_iddpm_preconditioning():
    net, F = with_stub(iDDPMPrecond, out_channels=6, model_type="DhariwalUNet")
    u = iddpm_u()
    np.testing.assert_allclose(net.u.numpy(), u, rtol=1e-5)
    assert net.sigma_min == pytest.approx(u[999], rel=1e-6) and net.sigma_max == pytest.approx(u[0], rel=1e-6)
    sigma = torch.tensor(SIGMAS, dtype=torch.float32)
    j = np.abs(SIGMAS[:, None] - u[None, :]).argmin(1)
    np.testing.assert_allclose(net.round_sigma(sigma).numpy(), u[j], rtol=1e-6)
    x = torch.randn(5, 3, 4, 4)
    D = net(x, sigma).double()
    s = sigma.double().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(net.model.seen[1], torch.tensor(999.0 - j, dtype=torch.float32))
    c_in_x = x.double() / (s**2 + 1).sqrt()
    torch.testing.assert_close(net.model.seen[0].double(), c_in_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D, x.double() - s * F[:, :3].double(), rtol=1e-5, atol=1e-5)  # 2nd half unused


def test_reduced_precision_rule():
    """fp16 only on CUDA when use_fp16 and not force_fp32; an explicit dtype replaces fp16 on CUDA only."""
    net, _ = with_stub(EDMPrecond, model_type="SongUNet")
    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    net.use_fp16 = True
    assert net.model_dtype(cuda, False, None) == torch.float16
    assert net.model_dtype(cuda, True, None) == torch.float32
    assert net.model_dtype(cpu, False, None) == torch.float32
    assert net.model_dtype(cuda, False, torch.bfloat16) == torch.bfloat16
    assert net.model_dtype(cpu, False, torch.bfloat16) == torch.float32
    net.use_fp16 = False
    assert net.model_dtype(cuda, False, None) == torch.float32


def test_edm_coefficients_closed_form():
    """EDM Table 1 at σ = σ_d: c_skip = ½, c_out = σ_d/√2, c_in = 1/(σ_d√2), c_noise = ¼ ln σ_d; for every σ
    c_in²(σ² + σ_d²) = 1 (unit-variance input) and c_out² = σ_d²(1 − c_skip) (Karras et al. 2022, App. B.6)."""
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([sd], dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(0.5) and c_out.item() == pytest.approx(sd / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / (sd * math.sqrt(2))) and c_noise.item() == pytest.approx(math.log(sd) / 4)
    sigma = torch.tensor([0.002, 0.3, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_coefficients(sigma, sd)
    torch.testing.assert_close(c_in**2 * (sigma**2 + sd**2), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_skip + c_out**2 / sd**2, torch.ones(3, dtype=torch.float64))
