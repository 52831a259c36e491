"""EDM's geometric augmentation pipeline, as the official Diff-Instruct recipe uses it on the fake-score step.

Karras et al. 2022 (EDM), Appendix F.2, after the ADA pipeline of Karras et al. 2020: each image is x-flipped,
y-flipped, scaled, rotated, anisotropically scaled and translated, each with its own probability, and the
network is told what was done through a 9-dim "augmentation label" (`augment_labels` of EDM's U-Nets) so it
learns the clean distribution as the label-zero slice (NVlabs/edm training/augment.py `AugmentPipe`).
Diff-Instruct (pkulwj1994/diff_instruct di_train.py) enables the six geometric operations with probability
multipliers xflip 1e8 (a free 50 % flip whatever p), yflip, scale, rotate_frac, aniso, translate_frac 1,
overall p = 0.12, and no colour or integer-blit operations; only those six are implemented here.

Sampling and applying are separate so the training loop can draw the parameters of the whole global
batch from its own seeded CPU generator (bit-exact resume, any process count) and apply its slice. The
draws follow the original's order and tensor sizes, so a generator seeded like `torch.manual_seed` gives
the original's parameters. Geometric warps are done as in the original: reflect-pad, 2x upsample with the
symlet-6 low-pass filter, bilinear resampling under the inverse transform, filter and 2x downsample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Symlet-6 low-pass filter (Daubechies' least-asymmetric wavelet with 6 vanishing moments), sums to √2.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

# Operations in the order of the draws and of the labels, with the size of each one's label.
LABEL_SIZES = {"xflip": 1, "yflip": 1, "scale": 1, "rotate_frac": 2, "aniso": 2, "translate_frac": 2}
GEOMETRIC = ("scale", "rotate_frac", "aniso", "translate_frac")
AUGMENT_DIM = 9  # label size with all six on: EDM's `augment_dim`


@dataclass(frozen=True)
class AugmentPipe:
    """Probability multipliers (0 switches an operation off: no draws, no label) and ranges. The defaults
    are the official Diff-Instruct settings; the label has 9 entries with all six operations on."""

    p: float = 0.12  # overall probability multiplier
    xflip: float = 1e8
    yflip: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2  # log2 std of isotropic scaling
    rotate_frac_max: float = 1.0  # rotation range, 1 = full circle
    aniso_std: float = 0.2  # log2 std of anisotropic scaling
    aniso_rotate_prob: float = 0.5  # probability of scaling along rotated axes
    translate_frac_std: float = 0.125  # std of translation, relative to the image size

    def enabled(self) -> list[str]:
        return [name for name in LABEL_SIZES if getattr(self, name) > 0]

    @property
    def label_dim(self) -> int:
        return sum(LABEL_SIZES[name] for name in self.enabled())

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample parameters ([n] float32 CPU tensors, zero where an operation is not applied):
        flips 0/1, scale and aniso as N(0, 1) exponents, rotation angle and aniso axis in radians,
        translation in units of translate_frac_std."""
        def gate(multiplier: float, value: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return torch.where(u < multiplier * self.p, value, torch.zeros_like(value)).float()

        rand = lambda *size: torch.rand(size, generator=generator)  # noqa: E731
        randn = lambda *size: torch.randn(size, generator=generator)  # noqa: E731
        out: dict[str, torch.Tensor] = {}
        for name in ("xflip", "yflip"):
            if getattr(self, name) > 0:
                flip = torch.randint(2, (n,), generator=generator)
                out[name] = gate(getattr(self, name), flip, rand(n))
        if self.scale > 0:
            out["scale"] = gate(self.scale, randn(n), rand(n))
        if self.rotate_frac > 0:
            angle = (rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max)
            out["rotate"] = gate(self.rotate_frac, angle, rand(n))
        if self.aniso > 0:
            exponent, axis = randn(n), (rand(n) * 2 - 1) * math.pi
            out["aniso"] = gate(self.aniso, exponent, rand(n))
            out["aniso_angle"] = torch.where(rand(n) < self.aniso_rotate_prob, axis, torch.zeros_like(axis))
        if self.translate_frac > 0:
            shift = randn(2, n)  # one draw of 2n values, as the original (CPU randn is size-dependent)
            u = rand(1, n)[0]
            out["translate_x"], out["translate_y"] = gate(self.translate_frac, shift[0], u), \
                gate(self.translate_frac, shift[1], u)
        return out

    def labels(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The augmentation label [n, label_dim] the network is given: flips, scale exponent,
        (cos θ − 1, sin θ) of the rotation, the aniso exponent times (cos, sin) of its axis, translation."""
        columns = []
        for name in self.enabled():
            if name == "rotate_frac":
                columns += [params["rotate"].cos() - 1, params["rotate"].sin()]
            elif name == "aniso":
                angle = params["aniso_angle"]
                columns += [params["aniso"] * angle.cos(), params["aniso"] * angle.sin()]
            elif name == "translate_frac":
                columns += [params["translate_x"], params["translate_y"]]
            else:
                columns.append(params[name])
        return torch.stack(columns, dim=1).float()

    def inverse_transform(self, params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """[n, 3, 3] map from output to input pixel coordinates (centred, x right, y down): the product
        of the inverses of scale, rotation, anisotropic scale and translation, in that order."""
        first = next(iter(params.values()))
        inverse = torch.eye(3, device=first.device).expand(first.shape[0], 3, 3)
        if self.scale > 0:
            s = torch.exp2(params["scale"] * self.scale_std)
            inverse = inverse @ _scale(1 / s, 1 / s)
        if self.rotate_frac > 0:
            inverse = inverse @ _rotate(params["rotate"])
        if self.aniso > 0:
            s, axis = torch.exp2(params["aniso"] * self.aniso_std), params["aniso_angle"]
            # 1 / (1 / s), not s: rounds as the original's inverse of scale(s, 1/s) (bit-identical outputs)
            inverse = inverse @ _rotate(-axis) @ _scale(1 / s, 1 / (1 / s)) @ _rotate(axis)
        if self.translate_frac > 0:
            inverse = inverse @ _translate(-params["translate_x"] * (width * self.translate_frac_std),
                                           -params["translate_y"] * (height * self.translate_frac_std))
        return inverse

    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images, augmentation labels) for images [n, C, H, W] and parameters from `sample`
        (on any device; moved to the images' device)."""
        params = {k: v.to(images.device) for k, v in params.items()}
        if "xflip" in params:
            images = torch.where(params["xflip"].reshape(-1, 1, 1, 1) == 1, images.flip(3), images)
        if "yflip" in params:
            images = torch.where(params["yflip"].reshape(-1, 1, 1, 1) == 1, images.flip(2), images)
        if any(getattr(self, name) > 0 for name in GEOMETRIC):  # the original resamples even at identity
            inverse = self.inverse_transform(params, images.shape[2], images.shape[3])
            images = warp(images, inverse)
        return images, self.labels(params)


def _matrix(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """[n, 3, 3] from 3x3 entries that are [n] tensors or numbers."""
    entries = [torch.as_tensor(e, dtype=like.dtype, device=like.device).expand(like.shape) for row in rows
               for e in row]
    return torch.stack(entries, dim=-1).reshape(*like.shape, 3, 3)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _const(rows: list[list[float]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=device)


def warp(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Resample images [n, C, H, W] so that output pixel p shows input pixel inverse·p (centred pixel
    coordinates), alias-free: reflect-pad by what the transform brings into view, upsample 2x, bilinear
    sampling, downsample 2x, both with the symlet-6 filter."""
    n, channels, height, width = images.shape
    device = images.device
    taps = torch.tensor(SYM6, dtype=images.dtype, device=device)
    pad = len(SYM6) // 4
    cx, cy = (width - 1) / 2, (height - 1) / 2
    inverse = inverse.to(device)

    # Margin: how far the transformed corners reach beyond the image (plus the filter's reach), per side.
    corners = _const([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device).t()
    reach = (inverse @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, n·4]
    margin = torch.cat([-reach, reach]).amax(dim=1) + _const([[2 * pad - cx, 2 * pad - cy] * 2], device)[0]
    margin = margin.clamp(min=0).minimum(_const([[width - 1, height - 1] * 2], device)[0])
    left, top, right, bottom = (int(m) for m in margin.ceil().to(torch.int32))
    images = F.pad(images, [left, right, top, bottom], mode="reflect")

    def shift(tx: float, ty: float) -> torch.Tensor:
        return _translate(torch.tensor(float(tx), device=device), torch.tensor(float(ty), device=device))

    def scale(sx: float, sy: float) -> torch.Tensor:
        return _scale(torch.tensor(float(sx), device=device), torch.tensor(float(sy), device=device))

    inverse = shift((left - right) / 2, (top - bottom) / 2) @ inverse

    # 2x upsampling: zero-stuff, then convolve with the filter (x, then y).
    images = _upsample(images, taps, dim=3)
    images = _upsample(images, taps, dim=2)
    inverse = scale(2, 2) @ inverse @ scale(0.5, 0.5)
    inverse = shift(-0.5, -0.5) @ inverse @ shift(0.5, 0.5)

    # Bilinear resampling into the padded 2x grid: affine_grid works in [-1, 1] coordinates.
    out_h, out_w = (height + 2 * pad) * 2, (width + 2 * pad) * 2
    # (1 / (2 / out_w) rounds as the original's inverse of scale(2 / out_w): bit-identical outputs)
    inverse = scale(2 / images.shape[3], 2 / images.shape[2]) @ inverse @ scale(1 / (2 / out_w), 1 / (2 / out_h))
    grid = F.affine_grid(inverse[:, :2, :], [n, channels, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # 2x downsampling: filter and keep every other sample (x, then y), then crop the padding.
    images = _downsample(images, taps, dim=3)[:, :, :, pad:-pad]
    return _downsample(images, taps, dim=2)[:, :, pad:-pad, :]


def _depthwise(images: torch.Tensor, taps: torch.Tensor, dim: int, stride: int, padding: int) -> torch.Tensor:
    """Correlate every channel with `taps` along dim 3 (x) or 2 (y)."""
    channels = images.shape[1]
    shape = (channels, 1, 1, len(taps)) if dim == 3 else (channels, 1, len(taps), 1)
    return F.conv2d(images, taps.reshape(shape[2:]).expand(shape), groups=channels,
                    stride=(1, stride) if dim == 3 else (stride, 1),
                    padding=(0, padding) if dim == 3 else (padding, 0))


def _upsample(images: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Insert a zero after every sample along `dim` (dropping the last), then convolve with taps:
    length L becomes 2L."""
    stuffed = torch.stack([images, torch.zeros_like(images)], dim=dim + 1).flatten(dim, dim + 1)
    stuffed = stuffed.narrow(dim, 0, stuffed.shape[dim] - 1)
    return _depthwise(stuffed, taps.flip(0), dim, stride=1, padding=(len(taps) + 1) // 2)


def _downsample(images: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    return _depthwise(images, taps, dim, stride=2, padding=(len(taps) - 1) // 2)

