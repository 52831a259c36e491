"""Sample-based distances for vector data (toy problems)."""

from __future__ import annotations

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance (Székely & Rizzo 2013): 2·E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖, as the V-statistic
    (means over all pairs), which is never negative; two independent samples of one distribution give
    a positive value of order 1/n (the noise floor)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def modes_covered(samples: torch.Tensor, means: torch.Tensor, std: float, min_share: float = 0.5
                  ) -> int:
    """Number of modes that receive at least `min_share` of their expected share (n/K) of the samples
    lying within 3·std of their centre."""
    dist = torch.cdist(samples.double(), means.double())
    nearest = dist.argmin(1)
    close = dist.min(1).values < 3 * std
    counts = torch.bincount(nearest[close], minlength=means.shape[0])
    return int((counts >= min_share * samples.shape[0] / means.shape[0]).sum())
