"""Running a detector over uint8 image batches and keeping what each metric needs from its outputs.

The detector is any callable `detector(images uint8 [N, 3, H, W]) -> {'pool3': [N, D], 'logits': [N, K] or
None}` (metrics/detector.py). FID keeps streaming moments, KID a bounded sample of features, IS the logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import UserError
from fileformats.progress import Progress
from metrics.stats import FeatureStats, Reservoir

KID_CAPACITY = 50_000  # features kept for KID: all of NVIDIA's kid50k samples
NO_LOGITS = ("the detector has no classifier head (weights without the 1008-way fc), so the Inception Score "
             "cannot be computed: leave IS out of --metrics or use weights that include the classifier")


def device_of(obj: object) -> torch.device:
    """The device of a module-like object: its `device` attribute, else its first parameter or buffer."""
    dev = getattr(obj, "device", None)
    if dev is not None:
        return torch.device(dev)
    if isinstance(obj, torch.nn.Module):
        for t in itertools.chain(obj.parameters(), obj.buffers()):
            return t.device
    return torch.device("cpu")


@dataclass
class FeatureCollector:
    """Feeds detector outputs to each metric's accumulator; a metric with count n sees the first n samples
    of the stream (0 = metric not wanted)."""

    num_fid: int = 0
    num_is: int = 0
    num_kid: int = 0
    kid_capacity: int = KID_CAPACITY
    seed: int = 0
    seen: int = 0
    fid: FeatureStats | None = None
    kid: Reservoir | None = None
    _logits: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return max(self.num_fid, self.num_is, self.num_kid)

    def add(self, out: dict[str, torch.Tensor | None]) -> None:
        pool = out["pool3"].detach()
        start, b = self.seen, len(pool)

        def take(limit: int) -> int:
            return max(0, min(b, limit - start))

        if k := take(self.num_fid):
            self.fid = self.fid or FeatureStats(pool.shape[1])
            self.fid.update(pool[:k])
        if k := take(self.num_kid):
            self.kid = self.kid or Reservoir(pool.shape[1], self.kid_capacity, self.seed)
            self.kid.update(pool[:k].cpu())
        if k := take(self.num_is):
            logits = out.get("logits")
            if logits is None:
                raise UserError(NO_LOGITS)
            self._logits.append(logits[:k].detach().to("cpu", torch.float32).numpy())
        self.seen += b

    @property
    def logits(self) -> np.ndarray:
        return np.concatenate(self._logits) if self._logits else np.zeros((0, 0), np.float32)


def collect(batches: Iterable[torch.Tensor], detector, collector: FeatureCollector, desc: str = "",
            total: int | None = None) -> None:
    """Run `detector` on uint8 batches under no_grad until the collector has `collector.total` samples or
    the batches run out; `total` is the expected count shown by the progress bar."""
    device = device_of(detector)
    with torch.no_grad(), Progress(total, desc, unit="img") as bar:
        for images in batches:
            if images.dtype != torch.uint8:
                raise TypeError(f"the detector takes uint8 images, got {images.dtype}")
            collector.add(detector(images.to(device)))
            bar.update(len(images))
            if collector.seen >= collector.total:
                break
