"""Inception front ends: uint8 images [N, 3, H, W] (0..255) -> the network's input [N, 3, 299, 299].

`nvidia` (the default) is what NVIDIA's detector (stylegan2-ada-pytorch, EDM, Diff-Instruct's metrics),
torch-fidelity and the TF graph itself do: TF1 `resize_bilinear(align_corners=False)` to 299, then
(x - 128) / 128. TF1's legacy resize samples output pixel i at source coordinate i * in / out (no
half-pixel offset) and clamps the upper neighbour to the last pixel. NVIDIA emulates it with
affine_grid / grid_sample (border padding) and a theta offset of 1/in - 1/299, which is the same map.

`pytorch-fid` is pytorch-fid's: x / 255 to [0, 1], torch bilinear resize (half-pixel centres,
align_corners=False, no antialiasing) to 299, then 2x - 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 299


@functools.lru_cache(maxsize=16)
def _tf1_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] float64 interpolation matrix of TF1 legacy bilinear resizing along one axis.

    src = i * n_in / n_out, lo = floor(src), hi = min(lo + 1, n_in - 1), w = src - lo:
    out[i] = (1 - w) * in[lo] + w * in[hi].
    """
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    w = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - w, accumulate=True)
    m.index_put_((rows, hi), w, accumulate=True)
    return m


def tf1_resize(x: Tensor, size: int = SIZE) -> Tensor:
    """TF1 legacy bilinear resize of float [N, C, H, W] to [N, C, size, size]: out = R_h x R_w^T.

    Bilinear interpolation is separable, so two small matrix products give exactly TF's formula
    (up to float rounding); the identity when the image already has the size.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    rh = _tf1_matrix(h, size).to(x.device, x.dtype)
    rw = _tf1_matrix(w, size).to(x.device, x.dtype)
    return rh @ x @ rw.T


def _check(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")


def nvidia(images: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] -> TF1 bilinear to 299 -> (x - 128) / 128, float32 in [-1, 1)."""
    _check(images)
    return (tf1_resize(images.float()) - 128) / 128


def pytorch_fid(images: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] -> x / 255 -> torch bilinear (align_corners=False) to 299 -> 2x - 1."""
    _check(images)
    x = F.interpolate(images.float() / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


FRONTENDS: dict[str, Callable[[Tensor], Tensor]] = {"nvidia": nvidia, "pytorch-fid": pytorch_fid}
