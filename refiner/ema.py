"""Exponential moving average of the generator with EDM's half-life rule (Karras et al. 2022, App. F.4;
edm training_loop.py): the half-life is given in thousands of images and ramps up with training."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int, cur_nimg: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """β = 0.5^(batch / h), h = halflife_kimg·1000, capped by cur_nimg·rampup_ratio when ramping up."""
    h = halflife_kimg * 1000
    if rampup_ratio is not None:
        h = min(h, cur_nimg * rampup_ratio)
    return 0.5 ** (batch / max(h, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·model for parameters (one multi-tensor lerp, no copies where the dtypes agree);
    buffers are copied."""
    pairs = [(p_ema, p if p.dtype == p_ema.dtype else p.to(p_ema.dtype))  # no_grad: no detach needed
             for p_ema, p in zip(ema.parameters(), model.parameters())]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
