"""FID / IS / KID of a generator or an image set against reference statistics, NVIDIA's way.

Metric names follow NVIDIA's metric_main: `fid50k_full`, `is50k`, `kid50k_full`; also `fid10k`, `fid2000`
or plain `fid` (count from `num`). Reference statistics always cover the whole reference set, which is
what the `_full` suffix means; the suffix is accepted and changes nothing.

A generator is anything with `sample_latents(n, generator)`, `sample_labels(n, generator)` and
`__call__(z, c)` returning images in [-1, 1] (the Generator interface, duck-typed here): latents from its
own prior, labels uniform over its classes, output quantised as NVIDIA does (images.quantize).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError
from common.values import is_integer
from gan_adapters.base import seeded_global_rng
from metrics.features import NO_LOGITS, FeatureCollector, collect, device_of
from metrics.images import ImageSet, open_image_set, quantize, to_rgb
from metrics.reference import ReferenceStats, load_reference, open_reference
from metrics.stats import check_is_samples, fid, inception_score, kid

DEFAULT_GENERATOR_SAMPLES = 50_000  # fid50k / is50k / kid50k
_NAME = re.compile(r"(fid|is|kid)(?:(\d+)([km]?))?(_full)?")
_SCALE = {"": 1, "k": 1_000, "m": 1_000_000}


@dataclass(frozen=True)
class MetricRequest:
    name: str  # 'fid', 'is' or 'kid'
    num: int | None  # samples it uses; None = the caller's default


def parse_metrics(spec: str | Sequence[str]) -> list[MetricRequest]:
    """'fid50k_full,is50k' or ['fid', 'kid10k'] -> requests. Each metric may appear once."""
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise UserError("no metrics given: use e.g. --metrics fid50k_full,is50k")
    requests: dict[str, MetricRequest] = {}
    for item in items:
        m = _NAME.fullmatch(item)
        if m is None:
            raise UserError(f"unknown metric {item!r}: use fid, is or kid, optionally with a sample count "
                            "(fid50k, is10k, kid50k_full, fid2000)")
        name, digits, unit = m.group(1), m.group(2), m.group(3) or ""
        num = int(digits) * _SCALE[unit] if digits else None
        if num == 0:
            raise UserError(f"metric {item!r} asks for 0 samples")
        if name == "is" and num is not None:
            check_is_samples(num)  # before any sampling
        if name in requests:
            raise UserError(f"metric {name!r} is asked for twice ({item!r}); ask for each metric once")
        requests[name] = MetricRequest(name, num)
    return list(requests.values())


def open_needed_reference(requests: Sequence[MetricRequest], ref: object) -> ImageSet | ReferenceStats | None:
    """The reference that FID and KID compare with, opened and checked without a detector pass (the commands
    call it before anything else); None when no request needs one."""
    names = {r.name for r in requests}
    if not names & {"fid", "kid"}:
        return None
    if ref is None:
        raise UserError("FID and KID need --ref (ref= in Python: an image folder, a dataset .zip, an .npz of images "
                        "or an .npz with mu and sigma); or ask only for IS")
    return open_reference(ref, need_features="kid" in names)


def generated_batches(G, num: int, batch_size: int = 64, seed: int = 0) -> Iterator[torch.Tensor]:
    """`num` samples of G as uint8 RGB batches [B, 3, H, W]; latents and labels come from G's own priors
    through one torch.Generator seeded with `seed`, so a seed gives the same latents to any generator
    with the same priors (before / after refinement). What G draws itself (StyleGAN2's noise inputs) comes
    from torch's global generator seeded per batch from `seed`, and its state is restored afterwards."""
    rng = torch.Generator(device_of(G)).manual_seed(seed)
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        with torch.no_grad(), seeded_global_rng(seed, f"samples/{start}", device_of(G)):
            z = G.sample_latents(b, rng)
            c = G.sample_labels(b, rng)
            x = G(z, c)
        if x.ndim != 4:
            raise UserError(f"the generator returns shape {list(x.shape)}, not images [N, C, H, W]; "
                            "image metrics need an image generator")
        yield to_rgb(quantize(x)).cpu()


def _is_generator(source: object) -> bool:
    return all(callable(getattr(source, a, None)) for a in ("sample_latents", "sample_labels", "__call__"))


def _check_arguments(source: object, detector: object, metrics: object, num: object, batch_size: object) -> None:
    """UserErrors for arguments of the wrong kind, before any work (the command line's types check them there)."""
    if source is None:
        raise UserError("no source to measure: give a generator, an image set (or its path) or uint8 images")
    if isinstance(detector, (str, os.PathLike)) or not callable(detector):
        raise UserError(f"detector is a {type(detector).__name__}, not a loaded detector: give "
                        "metrics.load_detector(path_or_url) (None there: the default detector)")
    if not isinstance(metrics, (str, Sequence)):
        raise UserError(f"metrics is a {type(metrics).__name__}: give names such as 'fid50k,is50k' or ['fid']")
    for name, value in (("num", 1 if num is None else num), ("batch_size", batch_size)):
        if not is_integer(value) or value < 1:
            raise UserError(f"{name} must be a whole number >= 1, not {value!r}")


def evaluate(source, detector, metrics: str | Sequence[str] = ("fid", "is", "kid"),
             ref: str | os.PathLike | ImageSet | ReferenceStats | None = None, num: int | None = None, *,
             batch_size: int = 64, seed: int = 0, fid_method: str = "sqrtm", frontend: str | None = None,
             cache_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Compute the requested metrics of `source` and return {'fid', 'is_mean', 'is_std', 'kid'} (those asked).

    source: a generator (duck-typed, see module doc), an image set or its path, uint8 images [N, 3, H, W],
    or an iterable of such batches. num: samples for metrics named without a count (default: 50k for a
    generator, the whole set for images, everything for batches). An image set larger than a metric's
    count is subsampled with a fixed seed (EDM's fid.py). ref: reference images or statistics (FID, KID)."""
    _check_arguments(source, detector, metrics, num, batch_size)
    requests = parse_metrics(metrics)
    if isinstance(source, (str, os.PathLike)):
        source = open_image_set(source)
    if isinstance(source, (torch.Tensor, np.ndarray)):  # all images at once, uint8 [N, 3, H, W]
        source = torch.as_tensor(source).split(batch_size)
    if isinstance(source, ImageSet):
        default = num or len(source)
    elif _is_generator(source):
        default = num or DEFAULT_GENERATOR_SAMPLES
    else:
        default = num or sys.maxsize  # until the iterable ends
    counts = {r.name: r.num or default for r in requests}
    total = max(counts.values())
    # every check before any sampling or detector pass
    if "is" in counts and getattr(detector, "has_logits", True) is False:
        raise UserError(NO_LOGITS)
    for name in ("fid", "kid"):
        if counts.get(name, 2) < 2:
            raise UserError(f"{name.upper()} needs at least 2 samples (a covariance or a pair), got {counts[name]}")
    if counts.get("is", sys.maxsize) < sys.maxsize:
        check_is_samples(counts["is"])
    if isinstance(source, ImageSet) and total > len(source):
        raise UserError(f"{source.path} holds {len(source)} images but {total} were asked for; "
                        "ask for fewer or add images")
    reference = None
    opened = open_needed_reference(requests, ref)
    if opened is not None:
        dim = getattr(detector, "feature_dim", None)
        if isinstance(opened, ReferenceStats) and dim is not None and len(opened.mu) != dim:
            raise UserError(f"the reference statistics have {len(opened.mu)} features but the detector gives {dim}: "
                            "they come from another network; make them with this detector")
        reference = load_reference(opened, detector, frontend=frontend, need_features="kid" in counts,
                                   batch_size=batch_size, cache_dir=cache_dir)

    if isinstance(source, ImageSet):
        indices = None if total == len(source) else np.sort(np.random.RandomState(seed).permutation(
            len(source))[:total])
        batches: Iterable[torch.Tensor] = source.batches(batch_size, indices)
    elif _is_generator(source):
        batches = generated_batches(source, total, batch_size, seed)
    else:
        batches = source

    collector = FeatureCollector(num_fid=counts.get("fid", 0), num_is=counts.get("is", 0),
                                 num_kid=counts.get("kid", 0), seed=seed)
    collect(batches, detector, collector, desc="metrics", total=total if total < sys.maxsize else None)
    short = {name: n for name, n in counts.items() if n < sys.maxsize and collector.seen < n}
    if collector.seen == 0:
        raise UserError("no images to evaluate: the sample source is empty")
    if short:
        raise UserError(f"only {collector.seen} samples arrived but {short} were asked for")

    results: dict[str, float] = {}
    if "fid" in counts:
        results["fid"] = fid(collector.fid.mean, collector.fid.cov, reference.mu, reference.sigma,
                             method=fid_method)
    if "is" in counts:
        results["is_mean"], results["is_std"] = inception_score(collector.logits)
    if "kid" in counts:
        results["kid"] = kid(collector.kid.features, reference.features, seed=seed)
    return results
