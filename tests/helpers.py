"""Small files the tests build with our own code (no NVIDIA code needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from fileformats import nvpickle
from teachers.edm_loader import network_record
from teachers.edm_precond import EDMPrecond

DATA = Path(__file__).parent / "data"


def small_edm_kwargs(resolution: int = 32, label_dim: int = 0, channels: int = 3) -> dict:
    """The golden NCSN++ fixture's configuration at another resolution / label count."""
    return dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, use_fp16=False,
                model_type="SongUNet", model_channels=16, channel_mult=[1, 2], channel_mult_noise=2,
                num_blocks=1, attn_resolutions=[resolution // 2], augment_dim=9, dropout=0.13,
                embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                resample_filter=[1, 3, 3, 1])


def write_edm_teacher(path: Path, seed: int = 0, **kw) -> Path:
    """An EDM snapshot pickle ({'ema': EDMPrecond}) with random weights, in NVIDIA's layout."""
    kwargs = small_edm_kwargs(**kw)
    torch.manual_seed(seed)
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # layers that start at zero get non-zero weights too
    nvpickle.dump({"ema": network_record(net, kwargs)}, path)
    return path
