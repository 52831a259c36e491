"""Reference statistics: mean and covariance of the detector's features over a real data set (what the
generated set is compared with), and, for KID, a sample of those features.

A reference is an image folder, a dataset .zip or an .npz of uint8 images (statistics over every image, no
mirroring: NVIDIA's fid50k_full / EDM's `fid.py ref`), or an .npz holding `mu` and `sigma` (EDM's published
reference files, e.g. cifar10-32x32.npz). Statistics from images are cached in `<cache>/metrics/` under a
hash of the image bytes, the detector's weights and its front end; the cache folder is $REFINER_CACHE or
~/.cache/refiner.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from fileformats.atomic import atomic_open, remove_stale_temps
from fileformats.npz import read_npz
from fileformats.sources import CACHE_ADVICE, STALE_TEMP_AGE, cache_root
from metrics.features import FeatureCollector, collect
from metrics.images import ArrayImages, ImageSet, open_image_set

CACHE_VERSION = 1  # bump when the cached content or its meaning changes


@dataclass
class ReferenceStats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64, unbiased covariance
    num: int  # images behind the statistics (0 when unknown, e.g. a published mu/sigma file)
    features: np.ndarray | None = None  # [<= features.KID_CAPACITY, D] float32 sample of features, for KID


def detector_fingerprint(detector: object) -> str:
    """sha256 over the detector's class name and, for a torch module, every state-dict tensor (name, dtype,
    shape, bytes): two detectors with the same weights share reference statistics."""
    h = hashlib.sha256(type(detector).__qualname__.encode())
    if isinstance(detector, torch.nn.Module):
        for name, t in sorted(detector.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stats_npz(path: Path) -> ReferenceStats | None:
    """An .npz with `mu` and `sigma` -> statistics; None if the file holds something else (images)."""
    data = read_npz(path, ("mu", "sigma", "num"))
    if not {"mu", "sigma"} <= set(data):
        return None
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    num = int(data["num"]) if "num" in data else 0
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} must be [D] and [D, D]")
    return ReferenceStats(mu, sigma, num)


def _compute(images: ImageSet, detector, need_features: bool, batch_size: int) -> ReferenceStats:
    n = len(images)
    collector = FeatureCollector(num_fid=n, num_kid=n if need_features else 0)
    collect(images.batches(batch_size), detector, collector, desc="reference statistics", total=n)
    return ReferenceStats(collector.fid.mean, collector.fid.cov, collector.fid.n,
                          collector.kid.features if collector.kid else None)


def _save(path: Path, stats: ReferenceStats) -> None:
    arrays = dict(mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num))
    if stats.features is not None:
        arrays["features"] = stats.features
    remove_stale_temps(path.parent, older_than=STALE_TEMP_AGE)
    with atomic_open(path, "wb", advice=CACHE_ADVICE) as f:
        np.savez(f, **arrays)


def _load_cached(path: Path) -> ReferenceStats | None:
    """The cached statistics, or None when the file is missing or unreadable (then it is recomputed)."""
    try:
        with np.load(path) as data:
            return ReferenceStats(data["mu"], data["sigma"], int(data["num"]),
                                  data["features"] if "features" in data else None)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def open_reference(ref: str | os.PathLike | ImageSet | ReferenceStats | np.ndarray | torch.Tensor,
                   need_features: bool = False) -> ImageSet | ReferenceStats:
    """What `ref` names, opened and checked without a detector pass (commands call it before any other work):
    the statistics of an mu/sigma .npz, or an image set (uint8 images in memory too). `need_features`: KID
    will need reference features, which mu and sigma alone do not give."""
    if isinstance(ref, (np.ndarray, torch.Tensor)):
        ref = ArrayImages(ref)
    if isinstance(ref, (str, os.PathLike)):
        path = Path(ref)
        if not path.exists():
            raise UserError(f"reference {path}: no such file or folder; give an image folder, a dataset "
                            ".zip, an .npz of images or an .npz with mu and sigma")
        stats = _stats_npz(path) if path.suffix.lower() == ".npz" else None
        ref = open_image_set(path) if stats is None else stats
    if not isinstance(ref, (ImageSet, ReferenceStats)):
        raise UserError(f"the reference is a {type(ref).__name__}; give a path (image folder, dataset .zip, .npz of "
                        "images or of mu and sigma), uint8 images or ReferenceStats")
    if need_features and isinstance(ref, ReferenceStats) and ref.features is None:
        raise UserError("the reference holds only mu and sigma, but KID needs reference features: give the "
                        "reference images (folder, dataset .zip or .npz) or leave KID out")
    return ref


def load_reference(ref: str | os.PathLike | ImageSet | ReferenceStats, detector, *, frontend: str | None = None,
                   need_features: bool = False, batch_size: int = 64,
                   cache_dir: str | os.PathLike | None = None) -> ReferenceStats:
    """Reference statistics from an mu/sigma .npz, or from images through `detector` (cached).

    `frontend` names the detector's input pipeline for the cache key (default: `detector.frontend` if
    it has one); `need_features` also keeps a feature sample for KID (cached with the moments)."""
    ref = open_reference(ref, need_features)
    if isinstance(ref, ReferenceStats):
        return ref
    frontend = frontend if frontend is not None else str(getattr(detector, "frontend", ""))
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "images": ref.content_hash(),
                                     "detector": detector_fingerprint(detector),
                                     "frontend": frontend}).encode()).hexdigest()
    cached = cache_root(cache_dir) / "metrics" / f"ref-{key[:40]}.npz"
    stats = _load_cached(cached)
    if stats is not None and (stats.features is not None or not need_features):
        return stats
    stats = _compute(ref, detector, need_features, batch_size)
    try:
        _save(cached, stats)
    except UserError as e:  # the numbers are still good: report them, compute them again next time
        print(f"warning: the reference statistics were not cached: {e}", file=sys.stderr)
    return stats
