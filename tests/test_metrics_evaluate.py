"""Reference statistics (cache), metric names, and evaluate() over image sets and generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_helpers import StandInDetector, TinyGenerator, random_images, write_folder

from common.errors import UserError
from metrics.evaluate import MetricRequest, evaluate, generated_batches, parse_metrics
from metrics.images import quantize
from metrics.reference import ReferenceStats, detector_fingerprint, load_reference
from metrics.stats import fid, inception_score, kid


def _features(detector: StandInDetector, images: np.ndarray) -> dict:
    out = detector(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    return {k: v.double().numpy() for k, v in out.items()}


def test_reference_from_images_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))
    imgs = random_images(40, seed=0)
    folder = write_folder(tmp_path / "ref", imgs)
    det = StandInDetector()
    first = load_reference(folder, det, batch_size=16)
    assert det.calls == 3
    feats = _features(StandInDetector(), imgs)["pool3"]
    np.testing.assert_allclose(first.mu, feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(first.sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)
    assert first.num == 40 and first.features is None
    cached = list((tmp_path / "cache" / "metrics").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"

    det.calls = 0
    second = load_reference(folder, det)
    assert det.calls == 0  # read from the cache
    np.testing.assert_array_equal(second.sigma, first.sigma)

    with_features = load_reference(folder, det, need_features=True)  # cache lacks features: recompute
    assert det.calls > 0 and with_features.features.shape == (40, 16)
    det.calls = 0
    load_reference(folder, det, need_features=True)
    assert det.calls == 0

    load_reference(folder, det, frontend="pytorch-fid")  # other front end: other key
    load_reference(folder, StandInDetector(seed=1))  # other weights: other key
    assert det.calls > 0 and len(list((tmp_path / "cache" / "metrics").iterdir())) == 3


def test_detector_fingerprint_follows_weights():
    assert detector_fingerprint(StandInDetector(0)) == detector_fingerprint(StandInDetector(0))
    assert detector_fingerprint(StandInDetector(0)) != detector_fingerprint(StandInDetector(1))


def test_reference_mu_sigma_npz(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.arange(3.0), sigma=np.eye(3))
    stats = load_reference(tmp_path / "ref.npz", StandInDetector())
    np.testing.assert_array_equal(stats.sigma, np.eye(3))
    with pytest.raises(UserError, match="KID needs reference features"):
        load_reference(tmp_path / "ref.npz", StandInDetector(), need_features=True)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(UserError, match="must be"):
        load_reference(tmp_path / "bad.npz", StandInDetector())
    with pytest.raises(UserError, match="no such file"):
        load_reference(tmp_path / "nothing.npz", StandInDetector())


@pytest.mark.parametrize("spec, expected", [
    ("fid50k_full,is50k", [MetricRequest("fid", 50_000), MetricRequest("is", 50_000)]),
    ("kid10k, fid2000", [MetricRequest("kid", 10_000), MetricRequest("fid", 2000)]),
    (["FID", "is"], [MetricRequest("fid", None), MetricRequest("is", None)]),
    ("fid1m", [MetricRequest("fid", 1_000_000)]),
])
def test_parse_metrics(spec, expected):
    assert parse_metrics(spec) == expected


@pytest.mark.parametrize("spec, match", [("fud50k", "unknown metric"), ("fid,fid10k", "twice"),
                                         ("", "no metrics"), ("is0", "0 samples"), ("fid50k_ful", "unknown"),
                                         ("is19", "at least 20 samples")])
def test_parse_metrics_errors(spec, match):
    with pytest.raises(UserError, match=match):
        parse_metrics(spec)


def test_evaluate_image_sets_against_direct_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))
    a, b = random_images(60, seed=1), random_images(50, seed=2, offset=30)
    np.savez(tmp_path / "a.npz", x=a)
    ref = write_folder(tmp_path / "b", b)
    det = StandInDetector()
    out = evaluate(tmp_path / "a.npz", det, "fid,is,kid", ref=ref, batch_size=7)
    fa, fb = _features(det, a), _features(det, b)
    expected_fid = fid(fa["pool3"].mean(0), np.cov(fa["pool3"], rowvar=False), fb["pool3"].mean(0),
                       np.cov(fb["pool3"], rowvar=False))
    assert out["fid"] == pytest.approx(expected_fid, rel=1e-5)
    assert (out["is_mean"], out["is_std"]) == pytest.approx(inception_score(fa["logits"]), rel=1e-5)
    assert out["kid"] == pytest.approx(kid(fa["pool3"], fb["pool3"]), rel=1e-4)
    assert set(out) == {"fid", "is_mean", "is_std", "kid"}

    same = evaluate(ref, det, ["fid", "kid"], ref=ref)
    assert abs(same["fid"]) < 1e-6
    assert same["kid"] == pytest.approx(kid(fb["pool3"], fb["pool3"]), rel=1e-4) and same["kid"] < out["kid"]


def test_evaluate_subsets_and_counts(tmp_path):
    imgs = random_images(30, seed=3)
    np.savez(tmp_path / "a.npz", x=imgs)
    ref = ReferenceStats(np.zeros(16), np.eye(16), 0)
    det = StandInDetector()
    out = evaluate(tmp_path / "a.npz", det, "fid20,is20", ref=ref, seed=5)
    chosen = np.sort(np.random.RandomState(5).permutation(30)[:20])  # EDM's fixed-seed subset
    feats = _features(det, imgs[chosen])
    assert out["fid"] == pytest.approx(fid(feats["pool3"].mean(0), np.cov(feats["pool3"], rowvar=False),
                                           np.zeros(16), np.eye(16)), rel=1e-6)
    assert (out["is_mean"], out["is_std"]) == pytest.approx(inception_score(feats["logits"]), rel=1e-6)
    with pytest.raises(UserError, match="holds 30 images but 31"):
        evaluate(tmp_path / "a.npz", det, "fid31", ref=ref)
    with pytest.raises(UserError, match=r"FID and KID need --ref \(ref= in Python"):
        evaluate(tmp_path / "a.npz", det, "fid")
    with pytest.raises(UserError, match="no classifier head"):
        evaluate(tmp_path / "a.npz", StandInDetector(logits=False), "is")
    with pytest.raises(UserError, match="KID needs reference features"):
        evaluate(tmp_path / "a.npz", det, "kid", ref=ref)


def test_evaluate_iterable_of_batches():
    batches = [torch.from_numpy(random_images(9, seed=s).transpose(0, 3, 1, 2).copy()) for s in range(3)]
    out = evaluate(iter(batches), StandInDetector(), "is")
    logits = _features(StandInDetector(), np.concatenate([b.numpy().transpose(0, 2, 3, 1) for b in batches]))
    assert (out["is_mean"], out["is_std"]) == pytest.approx(inception_score(logits["logits"]), rel=1e-6)
    with pytest.raises(UserError, match="only 27 samples"):
        evaluate(iter(batches), StandInDetector(), "is", num=30)
    assert evaluate(torch.cat(batches), StandInDetector(), "is", batch_size=4) == pytest.approx(out, rel=1e-6)


def test_evaluate_generator_quantises_and_draws_labels():
    G, det = TinyGenerator(), StandInDetector()
    ref = ReferenceStats(np.zeros(16), np.eye(16), 0)
    out = evaluate(G, det, "fid50,is50", ref=ref, batch_size=16, seed=3)
    assert sum(len(x) for x in det.inputs) == 50 and G.label_calls == 4  # batches 16, 16, 16, 2
    rng = torch.Generator().manual_seed(3)
    z, c = G.sample_latents(16, rng), G.sample_labels(16, rng)
    assert torch.equal(det.inputs[0], quantize(G(z, c)))
    assert torch.unique(det.inputs[0]).numel() > 50  # real images, not a constant
    again = evaluate(G, StandInDetector(), "fid50,is50", ref=ref, batch_size=16, seed=3)
    assert again == out  # seeded


def test_generator_metrics_see_distribution_shift():
    det = StandInDetector()
    ref_images = torch.cat(list(generated_batches(TinyGenerator(), 200, seed=100))).numpy()
    feats = _features(det, ref_images.transpose(0, 2, 3, 1))["pool3"]
    ref = ReferenceStats(feats.mean(0), np.cov(feats, rowvar=False), 200, feats.astype(np.float32))
    near = evaluate(TinyGenerator(), det, "fid200,kid50", ref=ref)
    far = evaluate(TinyGenerator(shift=0.5), det, "fid200,kid50", ref=ref)
    assert far["fid"] > 5 * near["fid"] and far["kid"] > 5 * abs(near["kid"])


def test_generated_batches_gray_to_rgb():
    (batch,) = generated_batches(TinyGenerator(channels=1), 5, batch_size=8)
    assert batch.shape == (5, 3, 8, 8) and batch.dtype == torch.uint8
    assert torch.equal(batch[:, 0], batch[:, 2])


def test_arguments_of_the_wrong_kind_are_refused_before_any_detector_pass(tmp_path):
    """compute_metrics from Python: each mistake in one line, and the detector never runs."""
    images = random_images(24, seed=1).transpose(0, 3, 1, 2)  # NCHW uint8
    detector = StandInDetector()
    for kwargs, message in [(dict(source=None), "no source to measure"),
                            (dict(detector="inception.pt"), r"detector is a str, not a loaded detector: give "
                                                            r"metrics.load_detector\(path_or_url\)"),
                            (dict(metrics=None), "metrics is a NoneType"),
                            (dict(num=-1), "num must be a whole number >= 1, not -1"),
                            (dict(num=0), "num must be a whole number >= 1, not 0"),
                            (dict(batch_size=0), "batch_size must be a whole number >= 1, not 0"),
                            (dict(metrics="fid1", ref=images), "FID needs at least 2 samples"),
                            (dict(metrics="is", num=19), "at least 20 samples"),
                            (dict(metrics="fid", ref=3), "the reference is a int"),
                            (dict(metrics="fid", ref=tmp_path / "stats.npz"), "have 8 features but the detector "
                                                                               "gives 16")]:
        np.savez(tmp_path / "stats.npz", mu=np.zeros(8), sigma=np.eye(8))
        args = dict(source=images, detector=detector, metrics="is") | kwargs
        with pytest.raises(UserError, match=message):
            evaluate(args.pop("source"), args.pop("detector"), args.pop("metrics"), **args)
    assert detector.calls == 0


def test_a_reference_given_as_uint8_images_in_memory_equals_the_same_images_on_disk(tmp_path):
    images, ref = random_images(24, seed=1), random_images(24, seed=2, offset=20)  # NHWC uint8
    folder = write_folder(tmp_path / "ref", ref)
    from_disk = evaluate(images.transpose(0, 3, 1, 2), StandInDetector(), "fid", ref=folder, cache_dir=tmp_path / "c")
    in_memory = evaluate(images.transpose(0, 3, 1, 2), StandInDetector(), "fid", ref=torch.from_numpy(ref),
                         cache_dir=tmp_path / "c")
    assert in_memory == pytest.approx(from_disk, rel=1e-12) and from_disk["fid"] > 0
