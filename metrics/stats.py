"""Feature statistics and the scores built on them: FID, Inception Score, KID.

Conventions (docs/metrics_biggan_data.md §1.3-1.7):
- mean and covariance accumulate in float64 from per-batch sums (sum x, sum x x^T), so features are never
  all held at once; the covariance is the unbiased one (N - 1), as np.cov(rowvar=False) in pytorch-fid,
  torch-fidelity and EDM's fid.py (StyleGAN2-ADA divides by N; the difference is O(1/N)).
- FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- IS = exp(E_x KL(p(y|x) || p(y))) over 10 consecutive splits, mean and population std (np.std), no shuffle
  (NVIDIA's is50k).
- KID = unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over 100 random subsets of at
  most 1000 features each (NVIDIA's kid50k).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
import scipy.linalg
import torch

from common.errors import UserError

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class FeatureStats:
    """Streaming mean and covariance of feature vectors from float64 sums (sum x, sum x x^T), kept as torch
    tensors on the device of the first batch (a GPU does the [D, D] update per batch; MPS, which has no
    float64, accumulates on the CPU).

    `update` adds a batch [B, D]; `merge` adds another accumulator (e.g. one per process) and gives the
    same mean and covariance as one accumulator that saw both streams.
    """

    dim: int
    n: int = 0

    def __post_init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._sum_outer: torch.Tensor | None = None

    def _add(self, s: torch.Tensor, s_outer: torch.Tensor, n: int) -> None:
        if self._sum is None:
            self._sum, self._sum_outer = torch.zeros_like(s), torch.zeros_like(s_outer)
        self._sum += s.to(self._sum.device)
        self._sum_outer += s_outer.to(self._sum.device)
        self.n += n

    def update(self, feats: ArrayLike) -> None:
        x = torch.as_tensor(feats).detach()
        x = x.to("cpu" if x.device.type == "mps" else x.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [B, {self.dim}], got {list(x.shape)}")
        self._add(x.sum(0), x.T @ x, len(x))

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add `other` into self (in place); returns self."""
        _same_dim(self.dim, other.dim)
        if other._sum is not None:
            self._add(other._sum, other._sum_outer, other.n)
        return self

    @property
    def sum(self) -> np.ndarray:
        return np.zeros(self.dim) if self._sum is None else self._sum.cpu().numpy()

    @property
    def sum_outer(self) -> np.ndarray:
        return np.zeros((self.dim, self.dim)) if self._sum_outer is None else self._sum_outer.cpu().numpy()

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise UserError("no features were accumulated: the image set or sample count is empty")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance: (sum x x^T - n mu mu^T) / (n - 1)."""
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 samples, got {self.n}: use more images")
        mu = self.mean
        return (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)


@dataclass
class Reservoir:
    """A uniform random sample of at most `capacity` feature vectors from a stream (Vitter's algorithm R),
    kept as float32; what KID draws its subsets from. Holds everything while n <= capacity."""

    dim: int
    capacity: int
    seed: int = 0
    n: int = 0

    def __post_init__(self) -> None:
        self._kept = np.zeros((0, self.dim), np.float32)
        self._pending: list[np.ndarray] = []  # appended batches, joined on first need (no O(n^2) copies)
        self._rng = np.random.default_rng(self.seed)

    @property
    def features(self) -> np.ndarray:
        """The kept features [min(n, capacity), D]."""
        if self._pending:
            self._kept = np.concatenate([self._kept, *self._pending])
            self._pending = []
        return self._kept

    def update(self, feats: ArrayLike) -> None:
        """The i-th item of the stream (0-based) fills a free slot or replaces slot randint(0, i] if that
        is < capacity; when two items of a batch pick one slot, the later one stays (sequential order)."""
        x = _features(feats, self.dim).astype(np.float32)
        room = max(self.capacity - self.n, 0)
        if room:
            self._pending.append(x[:room])
        idx = np.arange(min(room, len(x)), len(x))
        if len(idx):
            slot = self._rng.integers(0, self.n + idx + 1)
            idx, slot = idx[slot < self.capacity], slot[slot < self.capacity]
            _, last_reversed = np.unique(slot[::-1], return_index=True)
            final = len(slot) - 1 - last_reversed
            self.features[slot[final]] = x[idx[final]]
        self.n += len(x)

    def merge(self, other: Reservoir) -> Reservoir:
        """Add `other` into self (in place); returns self. The merged sample takes from each side in
        proportion to the number of items it stands for."""
        _same_dim(self.dim, other.dim)
        mine, theirs = self.features, other.features
        total = self.n + other.n
        take = min(self.capacity, len(mine) + len(theirs))
        a = min(len(mine), round(take * self.n / total)) if total else 0
        b = min(len(theirs), take - a)
        self._kept = np.concatenate([mine[self._rng.choice(len(mine), a, replace=False)],
                                     theirs[self._rng.choice(len(theirs), b, replace=False)]])
        self.n = total
        return self


def _features(feats: ArrayLike, dim: int) -> np.ndarray:
    x = _as_float64(feats)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected features of shape [B, {dim}], got {list(x.shape)}")
    return x


def _same_dim(a: int, b: int) -> None:
    if a != b:
        raise ValueError(f"cannot merge statistics of dimension {b} into {a}")


def _sqrtm_diag(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """The diagonal of sqrtm(a) and whether the root is trustworthy: finite, not flagged singular, and a
    small residual |X X - a|_F / |a|_F."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = scipy.linalg.sqrtm(a)
    ok = bool(np.isfinite(x).all()) and not any(issubclass(w.category, scipy.linalg.LinAlgWarning)
                                                for w in caught)
    if ok:
        scale = max(np.linalg.norm(a), np.finfo(np.float64).tiny)
        ok = np.linalg.norm(x @ x - a) / scale < 1e-3
    return np.diagonal(x), ok


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """tr (S1 S2)^(1/2) by scipy.linalg.sqrtm (NVIDIA, pytorch-fid). When the product is singular or the
    root is not finite, eps*I is added to both covariances and the root is taken again (pytorch-fid).
    Imaginary parts from round-off are dropped; a large one (> 1e-3 on the diagonal) is an error."""
    diag, ok = _sqrtm_diag(s1 @ s2)
    if not ok:
        offset = eps * np.eye(len(s1))
        diag, ok = _sqrtm_diag((s1 + offset) @ (s2 + offset))
    if not np.isfinite(diag).all():
        raise UserError("the matrix square root in FID is not finite even with eps added to the "
                        "covariances: use method='eig' (--fid-method eig) or more samples")
    imag = float(np.abs(np.imag(diag)).max())
    if imag > 1e-3:
        raise UserError(f"the matrix square root in FID has a large imaginary component ({imag:.3g}): "
                        "use method='eig' (--fid-method eig) or more samples (at least the feature dimension)"
                        )
    return float(np.real(diag).sum())


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eig(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i), lambda = eigenvalues of the PSD matrix S1^(1/2) S2 S1^(1/2),
    which are those of S1 S2 (torch-fidelity takes them from eigvals(S1 @ S2)). Real and stable even
    for singular covariances."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def fid(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, method: str = "sqrtm",
        eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr (S1 S2)^(1/2).

    method 'sqrtm' takes the root with scipy.linalg.sqrtm (NVIDIA / pytorch-fid, with pytorch-fid's eps
    fallback); 'eig' uses eigenvalues (immune to the scipy 1.11-1.12 sqrtm regression)."""
    mu1, mu2, s1, s2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UserError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                        f"{s2.shape}; both sides must come from the same detector layer")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise UserError("FID statistics contain NaN or infinity: check the images and the detector")
    for side, s in (("first", s1), ("second", s2)):
        scale = max(float(np.abs(s).max()), np.finfo(np.float64).tiny)
        if (np.diagonal(s) < 0).any() or np.abs(s - s.T).max() > 1e-6 * scale:
            raise UserError(f"the {side} sigma of FID is not a covariance matrix (it must be symmetric with "
                            "variances >= 0 on its diagonal): a mu/sigma .npz that is damaged or holds something "
                            "else; make the reference from images")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    elif method == "eig":
        tr_covmean = _trace_sqrt_product_eig(s1, s2)
    else:
        raise UserError(f"unknown FID method {method!r}: use 'sqrtm' or 'eig'")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    if value < -1e-6 * max(float(np.trace(s1) + np.trace(s2)), 1.0):  # round-off reaches about 1e-12 of it
        raise UserError(f"FID came out negative ({value:.6g}): a covariance is not positive semi-definite; make the "
                        "reference statistics from images")
    return value


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


IS_SPLITS = 10  # NVIDIA's and torch-fidelity's
IS_MIN_SAMPLES = 2 * IS_SPLITS  # one sample per split scores exactly 1 whatever it is


def check_is_samples(n: int, num_splits: int = IS_SPLITS) -> None:
    """A UserError unless `n` samples give each of the Inception Score's splits at least 2."""
    if n < 2 * num_splits:
        raise UserError(f"the Inception Score needs at least {2 * num_splits} samples (2 in each of its "
                        f"{num_splits} splits; one per split always scores 1.0), got {n}")


def inception_score(logits: ArrayLike, num_splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) from classifier logits [N, K] (for the standard IS: the
    1008 logits of the TF Inception without the fc bias).

    p(y|x) = softmax(logits); split i is rows [i N / s, (i+1) N / s); score_i = exp(mean_x sum_y
    p(y|x) (log p(y|x) - log mean_x p(y|x))). Returns (mean, population std) over the splits."""
    logp = _log_softmax(_as_float64(logits))
    n = len(logp)
    check_is_samples(n, num_splits)
    scores = []
    for i in range(num_splits):
        part = logp[i * n // num_splits:(i + 1) * n // num_splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        kl = (p * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def kid(feats1: ArrayLike, feats2: ArrayLike, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int | None = 0) -> float:
    """Kernel Inception Distance (Binkowski et al. 2018) as NVIDIA computes it: for each subset, m features
    drawn without replacement from each set (m = min(n1, n2, max_subset_size)),
    MMD^2_u = [sum_{i!=j} k(x_i,x_j) + k(y_i,y_j)] / (m (m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2,
    k(a, b) = (a.b / d + 1)^3; the mean over subsets is returned."""
    x_all, y_all = _as_float64(feats1), _as_float64(feats2)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise UserError(f"KID features do not match: {list(x_all.shape)} vs {list(y_all.shape)}")
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise UserError(f"KID needs at least 2 features on each side, got {len(x_all)} and {len(y_all)}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m * (m - 1)) - 2 * b.sum() / m ** 2
    return float(total / num_subsets)
