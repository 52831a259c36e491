"""load_teacher: golden fixtures through the Denoiser wrapper, round trips of every preconditioner
through NVIDIA's pickle layout, and clear errors for files that are not EDM networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.errors import UserError
from fileformats import nvpickle
from teachers.base import Denoiser
from teachers.edm_loader import (
    EDMTeacher,
    load_teacher,
    network_record,
    resolve_device,
    resolve_dtype,
)
from teachers.edm_precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

DATA = Path(__file__).parent / "data"
COND = DATA / "edm-small-ddpmpp-edm-cond.pkl"


def test_fixture_as_denoiser():
    teacher = load_teacher(COND)
    ref = torch.load(DATA / "edm-small-ddpmpp-edm-cond.ref.pt", weights_only=True)
    assert isinstance(teacher, Denoiser) and isinstance(teacher, EDMTeacher)
    assert isinstance(teacher.network, EDMPrecond)
    assert teacher.data_shape == (3, 16, 16) and teacher.label_dim == 10
    assert (teacher.sigma_min, teacher.sigma_max, teacher.sigma_data) == (0.0, float("inf"), 0.5)
    assert teacher.record.class_name == "EDMPrecond" and "module source omitted" in teacher.record.module_src
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        D = teacher(ref["x"], ref["sigma"], ref["class_labels"], augment_labels=ref["augment_labels"])
        D64 = teacher(ref["x"].double(), ref["sigma"].double(), ref["class_labels"])
    scale = ref["sigma"].clamp(min=1).reshape(-1, 1, 1, 1)
    assert ((D - ref["D"]).abs() <= 1e-4 * scale).all()
    assert D64.dtype == torch.float64 and ((D64 - ref["D_noaug"]).abs() <= 1e-4 * scale).all()
    # No second copy of the weights: the network uses the record's tensors.
    stored = teacher.record.state_dict()["model.map_layer0.weight"]
    assert teacher.network.model.map_layer0.weight.data_ptr() == stored.data_ptr()


TINY_SONG = dict(model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], augment_dim=3, dropout=0.1)
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4])


@pytest.mark.parametrize("cls,kwargs", [
    (VPPrecond, dict(TINY_SONG, encoder_type="skip", decoder_type="skip")),
    (VEPrecond, dict(TINY_SONG, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                     resample_filter=[1, 3, 3, 1])),
    (iDDPMPrecond, TINY_ADM),
    (EDMPrecond, dict(TINY_ADM, augment_dim=2)),
])
def test_round_trip_through_nvidia_layout(tmp_path, cls, kwargs):
    """Our network -> records -> nvpickle file -> load_teacher gives the same function."""
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=4, **kwargs)
    net = cls(**kwargs).eval().requires_grad_(False)
    for p in net.parameters():  # make zero-initialised layers matter
        p.add_(0.05 * torch.randn_like(p))
    nvpickle.dump({"ema": network_record(net, kwargs), "loss_fn": None}, tmp_path / "net.pkl")
    teacher = load_teacher(tmp_path / "net.pkl")
    assert type(teacher.network) is cls
    assert (teacher.sigma_min, teacher.sigma_max) == (float(net.sigma_min), float(net.sigma_max))
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 1.0, 30.0]), torch.eye(4)[:3]
    assert torch.equal(teacher(x, sigma, labels), net(x, sigma, labels))
    assert torch.equal(teacher.round_sigma(sigma), net.round_sigma(sigma))


def test_stylegan_pickle_is_named():
    with pytest.raises(UserError, match=r"StyleGAN2-ADA snapshot \(keys G, D, G_ema\).*--generator"):
        load_teacher(DATA / "sg2ada-small-uncond.pkl")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(COND.read_bytes()[:300_000])
    with pytest.raises(UserError, match="truncated"):
        load_teacher(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_teacher(tmp_path / "nope.pkl")


def tiny_record(**overrides) -> nvpickle.PersistentObject:
    kwargs = dict(img_resolution=8, img_channels=3, **TINY_SONG)
    return network_record(EDMPrecond(**kwargs).eval(), dict(kwargs, **overrides))


@pytest.mark.parametrize("make,message", [
    (lambda: {"G_ema": tiny_record()}, r"expected an EDM network pickle.*G_ema"),
    (lambda: {"ema": tiny_record().state["_modules"]["model"]},
     r"'ema' is a SongUNet, not an EDM preconditioner"),
    (lambda: {"ema": tiny_record(num_heads=3)}, r"cannot rebuild EDMPrecond.*num_heads"),
    (lambda: {"ema": tiny_record(model_channels=16)}, r"do not fit EDMPrecond.*wrong shape"),
    (lambda: {"ema": tiny_record(augment_dim=0)},
     r"do not fit EDMPrecond.*unexpected \['model.map_augment.weight'\]"),
])
def test_not_an_edm_network(tmp_path, make, message):
    nvpickle.dump(make(), tmp_path / "x.pkl")
    with pytest.raises(UserError, match=message):
        load_teacher(tmp_path / "x.pkl")


def test_python_arguments_of_the_wrong_kind_are_one_line_errors():
    """load_teacher, load_generator and load_detector take Python values the command line's types would have
    checked: a BigGAN folder, an integer dtype, a truncation of the wrong type, a bad device."""
    from gan_adapters.loader import load_generator
    from metrics.detector import load_detector

    biggan = DATA / "biggan-deep-small"
    for call, message in [(lambda: load_teacher(biggan), "is a BigGAN-deep folder, a GAN, not a diffusion teacher"),
                          (lambda: load_teacher(COND, dtype=torch.int8), "unknown dtype torch.int8"),
                          (lambda: load_generator(biggan, truncation="a"), "BigGAN truncation must lie in"),
                          (lambda: load_detector(3), "not a int"),
                          (lambda: load_detector(COND, device="bogus"), "unknown device 'bogus'")]:
        with pytest.raises(UserError, match=message):
            call()


def test_device_and_dtype_options():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("fp8")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
