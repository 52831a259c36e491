"""The committed demo assets (assets/demo): they load, match the manifest, stay small, and the networks
reproduce the reference outputs stored at build time (teacher denoiser, GAN, classifier, and two of the
teacher's 18-step Heun samples)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from refiner.demo.assets import DEFAULT_ASSETS, EVAL_SEED, load_assets
from refiner.demo.build import MAX_SHARE, MIN_SHARE, select_snapshot, teacher_samples
from refiner.demo.fashion_mnist import FASHION_MNIST
from refiner.demo.runner import make_evaluator, score_images


@pytest.fixture(scope="module")
def assets():
    return load_assets()


def test_manifest_records_how_the_assets_were_built(assets):
    m = assets.manifest
    published = {spec.name: spec.sha256_gz for spec in FASHION_MNIST.values()}
    assert m["data"]["sha256"] == published  # built from the published Fashion-MNIST files
    assert set(m["build"]["seeds"]) == {"teacher", "gan", "classifier", "split"}
    assert m["build"]["wall_seconds"] > 0
    for net in ("teacher", "generator", "classifier"):
        assert m["networks"][net]["report"]["steps"] > 0
    assert m["networks"]["classifier"]["report"]["test_accuracy"] > 0.85
    total = sum((DEFAULT_ASSETS / name).stat().st_size for name in [*m["files"], "manifest.json"])
    assert total <= 15e6


def test_networks_reproduce_the_reference_outputs(assets):
    ref = assets.reference
    with torch.no_grad():
        d = assets.teacher(ref["teacher_x"], ref["teacher_sigma"])
        g = assets.generator()(ref["generator_z"])
        features, logits = assets.classifier(ref["classifier_in"].float() / 127.5 - 1)
    torch.testing.assert_close(d, ref["teacher_out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, ref["generator_out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features, ref["classifier_features"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref["classifier_logits"], rtol=1e-4, atol=1e-5)
    assert logits.argmax(1).tolist() == ref["classifier_logits"].argmax(1).tolist()


def test_teacher_samples_are_the_teachers_18_step_samples(assets):
    """Seeds 0 and 1 through the sampler again: the stored uint8 images, up to one grey level where a
    value sits on a rounding boundary (another CPU's arithmetic)."""
    again = teacher_samples(assets.teacher.network, [0, 1]).to(torch.int16)
    stored = assets.teacher_samples[:2].to(torch.int16)
    diff = (again - stored).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_reference_statistics_are_covariances(assets):
    for split in ("test", "train"):
        mu, cov = assets.stats[f"{split}_mu"], assets.stats[f"{split}_cov"]
        assert mu.shape == (assets.classifier.feature_dim,) and cov.shape == (len(mu), len(mu))
        np.testing.assert_allclose(cov, cov.T)
        assert np.linalg.eigvalsh(cov).min() > -1e-8


def test_a_damaged_asset_is_refused(tmp_path: Path):
    copy = tmp_path / "assets"
    shutil.copytree(DEFAULT_ASSETS, copy)
    data = bytearray((copy / "generator.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "generator.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="differs from the manifest"):
        load_assets(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json missing"):
        load_assets(copy)


def test_manifest_is_plain_json():
    json.loads((DEFAULT_ASSETS / "manifest.json").read_text())


def test_class_shares_count_argmax_predictions():
    from metrics.classifier import DomainFeatures, class_shares
    from metrics.stats import FeatureStats

    logits = np.eye(4)[[0, 0, 1, 3, 3, 3, 3, 3]] * 5.0 - 1.0  # two of class 0, one of 1, none of 2, five of 3
    features = DomainFeatures(FeatureStats(2), [logits[:3], logits[3:]])
    np.testing.assert_array_equal(class_shares(features), [0.25, 0.125, 0.0, 0.625])


def _build(shares_by_kimg: dict[str, list[float]]) -> dict:
    return {"gan": {"snapshots": {k: {"fd": 100.0 - float(k), "class_shares": v}
                                  for k, v in shares_by_kimg.items()}}}


def test_snapshot_rule_takes_the_first_that_covers_every_class():
    even, lopsided, missing = [0.1] * 10, [0.35] + [0.65 / 9] * 9, [0.0] + [1 / 9] * 9
    # sorted numerically, not as text ("8" < "16"); a class below 1% or one above 30% disqualifies
    kimg, reason = select_snapshot(_build({"16": even, "8": missing, "12": lopsided, "32": even}))
    assert kimg == "16" and "first snapshot" in reason
    kimg, reason = select_snapshot(_build({"8": missing, "16": lopsided}))
    assert kimg == "16" and "the last one" in reason


def test_committed_generator_covers_every_class_and_is_clearly_imperfect(assets):
    """Measured again here, not read back from the manifest: the committed classifier puts 1-30% of the
    committed GAN's samples into each class, and the GAN's FD is over 4x the teacher's."""
    from metrics.classifier import class_shares, embed
    from metrics.evaluate import generated_batches

    generator = assets.generator()
    shares = class_shares(embed(assets.classifier, generated_batches(generator, 2000, 500, seed=EVAL_SEED)))
    assert MIN_SHARE <= shares.min() and shares.max() <= MAX_SHARE, shares
    fd = make_evaluator(assets, 2000)(generator)["fd"]
    teacher_fd = score_images(assets, assets.teacher_samples)["fd"]
    assert fd > 4 * teacher_fd, (fd, teacher_fd)
