"""FID / IS / KID and the streaming statistics against closed forms and direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from common.errors import UserError
from metrics.stats import FeatureStats, Reservoir, fid, inception_score, kid

METHODS = ["sqrtm", "eig"]


def _gaussians(d: int, seed: int, commuting_basis: bool):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    q = ortho_group.rvs(d, random_state=seed) if commuting_basis else np.eye(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    # commuting covariances: tr (S1 S2)^(1/2) = sum sqrt(a_i b_i), so FID = |dmu|^2 + sum (sqrt a - sqrt b)^2
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    return mu1, s1, mu2, s2, closed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rotated", [False, True])
def test_fid_closed_form_commuting_covariances(method, rotated):
    mu1, s1, mu2, s2, closed = _gaussians(32, seed=3, commuting_basis=rotated)
    assert fid(mu1, s1, mu2, s2, method=method) == pytest.approx(closed, rel=1e-9)


def test_fid_methods_agree_with_torch_fidelity_formula_on_general_covariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 24)), rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 1
    m1, s1, m2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    # torch-fidelity's trace: sum sqrt(eigvals(S1 @ S2)) (complex sqrt, real part)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    for method in METHODS:
        assert fid(m1, s1, m2, s2, method=method) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_a_set_against_itself_is_zero(method):
    x = np.random.default_rng(1).normal(size=(500, 16))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(fid(mu, sigma, mu, sigma, method=method)) < 1e-8


def test_fid_sqrtm_fallback_on_singular_covariances():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.3  # rank 9 and 11 in 64 dimensions
    m1, s1, m2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    value = fid(m1, s1, m2, s2, method="sqrtm")
    assert np.isfinite(value)
    assert value == pytest.approx(fid(m1, s1, m2, s2, method="eig"), rel=1e-4)


def test_sigma_that_is_no_covariance_is_refused_and_a_negative_fid_is_an_error():
    mu = np.zeros(8)
    for sigma, message in [(-np.eye(8), "second sigma of FID is not a covariance matrix"),
                           (np.triu(np.ones((8, 8))), "second sigma of FID is not a covariance matrix")]:
        for method in METHODS:
            with pytest.raises(UserError, match=message):
                fid(mu, np.eye(8), mu, sigma, method=method)
    indefinite = np.zeros((8, 8))  # symmetric, variances >= 0, eigenvalues 3 and -1: tr 2, yet tr (S S)^(1/2) = 3
    indefinite[:2, :2] = [[1.0, 2.0], [2.0, 1.0]]
    with pytest.raises(UserError, match=r"FID came out negative \(-2\)"):
        fid(mu, indefinite, mu, indefinite, method="eig")


def test_fid_sqrtm_zero_covariance_takes_the_eps_route():
    y = np.random.default_rng(3).normal(size=(50, 16))
    mu1, s1, mu2, s2 = np.ones(16), np.zeros((16, 16)), y.mean(0), np.cov(y, rowvar=False)
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(s2)  # tr (0 S2)^(1/2) = 0
    assert fid(mu1, s1, mu2, s2, method="eig") == pytest.approx(closed, rel=1e-12)
    # sqrtm of the zero product is flagged singular -> eps I added: off by about 2 sqrt(eps) tr S2^(1/2)
    assert fid(mu1, s1, mu2, s2, method="sqrtm", eps=1e-6) == pytest.approx(closed, abs=0.05)
    assert fid(mu1, s1, mu2, s2, method="sqrtm", eps=1e-10) == pytest.approx(closed, abs=5e-4)


def test_fid_sqrtm_retries_with_eps_when_root_not_finite(monkeypatch):
    real_sqrtm, seen = scipy.linalg.sqrtm, []

    def flaky(a):
        seen.append(a.copy())
        return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    mu1, s1, mu2, s2, closed = _gaussians(8, seed=4, commuting_basis=True)
    assert fid(mu1, s1, mu2, s2, eps=1e-6) == pytest.approx(closed, abs=1e-4)
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], (s1 + 1e-6 * np.eye(8)) @ (s2 + 1e-6 * np.eye(8)))


def test_fid_large_imaginary_component_is_an_error(monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: np.eye(len(a)) * (1 + 0.5j))
    mu1, s1, mu2, s2, _ = _gaussians(4, seed=5, commuting_basis=False)
    with pytest.raises(UserError, match="imaginary"):
        fid(mu1, s1, mu2, s2, method="sqrtm")
    with pytest.raises(UserError, match="method"):
        fid(mu1, s1, mu2, s2, method="newton")


def test_fid_small_imaginary_parts_are_dropped(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-9j)
    mu1, s1, mu2, s2, closed = _gaussians(6, seed=6, commuting_basis=True)
    assert fid(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)


@pytest.mark.parametrize("splits", [[257], [1, 256], [100, 100, 57], [3] * 85 + [2]])
def test_feature_stats_equal_numpy_mean_and_cov(splits):
    x = np.random.default_rng(7).normal(loc=2.0, size=(257, 7))
    stats, start = FeatureStats(7), 0
    for b in splits:
        stats.update(x[start:start + b])
        start += b
    assert stats.n == 257
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_merge_equals_one_accumulator():
    x = np.random.default_rng(8).normal(size=(90, 5))
    one, a, b = FeatureStats(5), FeatureStats(5), FeatureStats(5)
    one.update(x)
    a.update(x[:31])
    b.update(x[31:60])
    b.update(x[60:])
    a.merge(b)
    assert a.n == 90
    np.testing.assert_allclose(a.mean, one.mean, rtol=1e-13)
    np.testing.assert_allclose(a.cov, one.cov, rtol=1e-12)
    with pytest.raises(UserError):
        _ = FeatureStats(5).cov


def test_reservoir_keeps_everything_up_to_capacity_then_a_uniform_sample():
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    small = Reservoir(2, capacity=50)
    small.update(x[:7])
    small.update(x[7:])
    np.testing.assert_array_equal(small.features, x.astype(np.float32))

    hits = np.zeros(20)
    for seed in range(1500):
        r = Reservoir(2, capacity=5, seed=seed)
        for start in range(0, 20, 6):
            r.update(x[start:start + 6])
        assert r.features.shape == (5, 2) and r.n == 20
        kept = r.features[:, 0].astype(int) // 2
        assert len(set(kept)) == 5
        hits[kept] += 1
    # each item is kept with probability 5/20; 1500 runs -> 375 +- 17 (1 sd)
    assert np.all(np.abs(hits - 375) < 80)


def test_reservoir_merge_takes_in_proportion():
    a, b = Reservoir(1, capacity=10, seed=0), Reservoir(1, capacity=10, seed=1)
    a.update(np.zeros((30, 1)))
    b.update(np.ones((10, 1)))
    a.merge(b)
    assert a.n == 40 and a.features.shape == (10, 1)
    assert a.features.sum() == pytest.approx(10 * 10 / 40, abs=0.5)


def test_inception_score_closed_forms():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)
    k = 7  # one-hot predictions, every class equally often in every split -> IS = k exactly
    logits = 200.0 * np.eye(k)[np.arange(10 * 3 * k) % k]
    mean, std = inception_score(logits, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)


def test_inception_score_splits_and_population_std():
    classes_per_split = [1, 2, 5, 10, 1, 2, 5, 10, 5, 2]
    rows = [np.eye(10)[np.arange(10) % c] for c in classes_per_split]  # split i spreads over c_i classes
    mean, std = inception_score(100.0 * np.concatenate(rows), num_splits=10)
    assert mean == pytest.approx(np.mean(classes_per_split), rel=1e-9)
    assert std == pytest.approx(np.std(classes_per_split), rel=1e-9)  # ddof=0
    assert std != pytest.approx(np.std(classes_per_split, ddof=1), rel=1e-3)


def test_inception_score_split_boundaries_are_floor_of_i_n_over_s():
    n, s = 25, 10
    split_of_row = np.array([max(i for i in range(s) if i * n // s <= r) for r in range(n)])
    logits = 100.0 * np.eye(s)[split_of_row]  # one class per split: IS 1 only if the boundaries match
    assert inception_score(logits, num_splits=s) == pytest.approx((1.0, 0.0), abs=1e-9)
    with pytest.raises(UserError, match="at least 20 samples"):  # a split of one sample scores 1 whatever it is
        inception_score(np.zeros((19, 4)), num_splits=10)
    assert inception_score(100.0 * np.eye(4)[np.arange(20) % 4], num_splits=10)[0] == pytest.approx(2.0)


def _mmd2_unbiased_direct(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_equals_direct_unbiased_mmd_when_subsets_are_whole_sets():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(30, 6)), rng.normal(loc=0.4, size=(30, 6))
    # m = min(30, 30, 1000) = 30: every subset is a permutation of the whole set
    assert kid(x, y, num_subsets=3) == pytest.approx(_mmd2_unbiased_direct(x, y), rel=1e-10)


def test_kid_with_subsets_separates_distributions():
    rng = np.random.default_rng(10)
    a, b, c = rng.normal(size=(600, 8)), rng.normal(size=(500, 8)), rng.normal(loc=0.5, size=(500, 8))
    same = kid(a, b, num_subsets=20, max_subset_size=100)
    shifted = kid(a, c, num_subsets=20, max_subset_size=100)
    assert abs(same) < 0.05 and shifted > 0.3
    assert kid(a, c, num_subsets=20, max_subset_size=100, seed=0) == shifted  # seeded
