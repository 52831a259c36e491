"""Pure tensor operations of StyleGAN2-ADA's generator (docs/pickle_formats.md §2.3-2.4).

Everything here is plain PyTorch (differentiable, any device, float32 or float16) and reproduces the
semantics of the original `torch_utils/ops` reference paths:

- `upfirdn2d`: upsample by zero insertion, pad (negative = crop), FIR-filter (true convolution),
  downsample by keeping every `down`-th pixel.
- `upsample2d` / `downsample2d`: `upfirdn2d` with the padding that gives exactly H·up / H/down.
- `bias_act`: x + b -> activation -> × gain -> clamp to ±clamp.
- `conv2d_resample`: a convolution with up/down-sampling; the padding is applied once, to the
  (up-sampled) input, and the low-pass filter surrounds the convolution.
- `modulated_conv2d`: StyleGAN2's weight (de)modulation, fused (grouped convolution) or not.
- `normalize_2nd_moment`: x / sqrt(mean(x²) + eps).
- `filtered_lrelu`: StyleGAN3's alias-free nonlinearity (bias, up-sample, lrelu, clamp, down-sample).

Padding lists follow the original's order: `[x_before, x_after, y_before, y_after]`; an int `p`
means `[p, p, p, p]` and a pair `[px, py]` means `[px, px, py, py]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F

Padding = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------------------
# Activations with their default slope and gain (gain keeps the signal's second moment for
# N(0, 1) inputs: sqrt(2) for ReLU-like functions).

@dataclass(frozen=True)
class Activation:
    func: Callable[[torch.Tensor, float], torch.Tensor]
    def_alpha: float
    def_gain: float


ACTIVATIONS: dict[str, Activation] = {
    "linear": Activation(lambda x, a: x, 0.0, 1.0),
    "relu": Activation(lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": Activation(lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": Activation(lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": Activation(lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": Activation(lambda x, a: F.elu(x), 0.0, 1.0),
    "selu": Activation(lambda x, a: F.selu(x), 0.0, 1.0),
    "softplus": Activation(lambda x, a: F.softplus(x), 0.0, 1.0),
    "swish": Activation(lambda x, a: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, dim: int = 1, act: str = "linear",
             alpha: float | None = None, gain: float | None = None,
             clamp: float | None = None) -> torch.Tensor:
    """y = clamp(act(x + b, alpha) · gain, -clamp, clamp); b broadcast along `dim`.

    `alpha` / `gain` default to the activation's own (lrelu: 0.2 / sqrt(2)); clamp None = no clamp.
    """
    spec = ACTIVATIONS[act]
    if b is not None:
        shape = [-1 if i == dim else 1 for i in range(x.ndim)]
        x = x + b.to(x.dtype).reshape(shape)
    x = spec.func(x, float(spec.def_alpha if alpha is None else alpha))
    gain = float(spec.def_gain if gain is None else gain)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-float(clamp), float(clamp))
    return x


# ------------------------------------------------------------------------------------------------
# FIR filtering with up/down-sampling.

def setup_filter(f: Sequence[float] | torch.Tensor, normalize: bool = True,
                 gain: float = 1.0) -> torch.Tensor:
    """A float32 FIR filter: 1-D taps become their outer product (2-D), normalised to sum 1, × gain.

    [1, 3, 3, 1] -> the 4x4 filter outer([1,3,3,1]) / 64 that every StyleGAN2 layer stores.
    """
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f * gain


def _parse_padding(padding: Padding) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    px0, px1, py0, py1 = padding
    return px0, px1, py0, py1


def _filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """(width, height) of a filter; None is the 1x1 identity."""
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def _pad(x: torch.Tensor, px0: int, px1: int, py0: int, py1: int) -> torch.Tensor:
    """Zero-pad the last two dims; negative amounts crop."""
    if px0 == px1 == py0 == py1 == 0:
        return x
    return F.pad(x, [px0, px1, py0, py1])


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up: int = 1, down: int = 1, padding: Padding = 0,
              flip_filter: bool = False, gain: float = 1.0) -> torch.Tensor:
    """Per channel: insert up-1 zeros after every pixel, pad, convolve with f, keep every down-th pixel.

    The convolution is 'valid' (every output's footprint lies inside the padded image) and is a true
    convolution (f flipped) unless flip_filter. A 1-D f is applied separably along x then y; the
    filter is scaled by gain^(f.ndim/2), so the total gain is `gain` either way.
    """
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = _pad(x, *_parse_padding(padding))
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    f = (f * gain ** (f.ndim / 2)).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None].expand(c, 1, *f.shape), groups=c)
    else:
        x = F.conv2d(x, f[None, None, None, :].expand(c, 1, 1, -1), groups=c)
        x = F.conv2d(x, f[None, None, :, None].expand(c, 1, -1, 1), groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Exactly (H·up, W·up): padding [(fw+up-1)//2, (fw-up)//2] per axis, gain up² (zeros carry none)."""
    fw, fh = _filter_size(f)
    padding = [(fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=padding, gain=gain * up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Exactly (H/down, W/down): padding [(fw-down+1)//2, (fw-down)//2] per axis."""
    fw, fh = _filter_size(f)
    padding = [(fw - down + 1) // 2, (fw - down) // 2, (fh - down + 1) // 2, (fh - down) // 2]
    return upfirdn2d(x, f, down=down, padding=padding, gain=gain)


# ------------------------------------------------------------------------------------------------
# Convolutions.

def _conv2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 0, groups: int = 1,
            flip_weight: bool = True) -> torch.Tensor:
    """conv2d; flip_weight=True is correlation (torch's conv2d), False a true convolution."""
    return F.conv2d(x, w if flip_weight else w.flip([2, 3]), stride=stride, padding=padding, groups=groups)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, up: int = 1,
                    down: int = 1, padding: Padding = 0, groups: int = 1,
                    flip_weight: bool = True) -> torch.Tensor:
    """Convolution with optional up/down-sampling by the FIR filter f (w: [out, in/groups, kh, kw]).

    Defined as: up-sample x by zero insertion, pad once (`padding` counts on the up-sampled grid,
    plus what the filter needs), then filter with f (gain up²), convolve with w ('valid'), then
    filter-and-decimate by `down`. The stages are linear and shift-invariant, so they are reordered
    where that is cheaper:
    - up > 1: zero insertion followed by a convolution is a strided transposed convolution, which
      gives the full convolution; the remaining padding (negative = crop) then goes to the filter.
    - down > 1: filter first, then a convolution with stride `down`.
    """
    kh, kw = int(w.shape[2]), int(w.shape[3])
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2

    if up > 1:
        if kh == kw == 1:  # a 1x1 convolution commutes with zero insertion: convolve the small image
            x = _conv2d(x, w, groups=groups, flip_weight=flip_weight)
            x = upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up * up)
        else:
            # conv_transpose2d convolves (flips the kernel); pre-flip when correlation is asked for.
            wt = w.flip([2, 3]) if flip_weight else w
            per_group = wt.shape[0] // groups  # [G·O, I, k, k] -> [G·I, O, k, k]
            wt = wt.reshape(groups, per_group, -1, kh, kw).transpose(1, 2).reshape(-1, per_group, kh, kw)
            x = F.conv_transpose2d(x, wt, stride=up, groups=groups)
            # The full convolution already holds (kw-1, kw-1) padding of the zero-inserted image,
            # less its last up-1 zeros: subtract that from the padding still to apply.
            x = upfirdn2d(x, f, padding=[px0 - kw + 1, px1 - kw + up, py0 - kh + 1, py1 - kh + up],
                          gain=up * up)
        return upfirdn2d(x, f, down=down) if down > 1 else x
    if down > 1:
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1])
        return _conv2d(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if px0 == px1 == py0 == py1 and px0 >= 0:
        return _conv2d(x, w, padding=px0, groups=groups, flip_weight=flip_weight)
    return _conv2d(_pad(x, px0, px1, py0, py1), w, groups=groups, flip_weight=flip_weight)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     noise: torch.Tensor | None = None, up: int = 1, down: int = 1, padding: Padding = 0,
                     resample_filter: torch.Tensor | None = None, demodulate: bool = True,
                     flip_weight: bool = True, fused_modconv: bool = True,
                     input_gain: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2 modulated convolution (Karras et al. 2020, eqs. 1-3), then `+ noise`.

    w'_{n,o,i,k} = weight_{o,i,k} · s_{n,i};  demodulation d_{n,o} = (Σ_{i,k} w'² + 1e-8)^(-1/2).
    input_gain (StyleGAN3, Karras et al. 2021 App. F: 1/sqrt of the input's tracked mean square; a
    scalar, [I] or [N, I]) scales the input channels after demodulation, i.e. outside of it.
    Fused: one grouped convolution with per-sample weights w'·d. Not fused (same result, and no
    per-sample weights in memory: the training path): scale the activations by s, convolve with
    the shared weight, scale by d, add noise.
    With float16 activations and demodulation, weight and styles are first divided by their max-abs
    (weight also by sqrt(fan_in)) to avoid float16 overflow; demodulation cancels these factors.
    """
    n = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / math.sqrt(in_ch * kh * kw)
                           / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)

    dcoefs = None
    if demodulate:
        # Σ_{i,k} (weight_{o,i,k} s_{n,i})² = Σ_i s_{n,i}² Σ_k weight_{o,i,k}²: an [N, I] x [I, O]
        # product instead of N per-sample weights, at float32 or better even under autocast.
        dtype = torch.promote_types(torch.promote_types(styles.dtype, weight.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            sq_weight = weight.to(dtype).square().sum(dim=[2, 3])  # [O, I]
            dcoefs = (styles.to(dtype).square() @ sq_weight.t() + 1e-8).rsqrt()  # [N, O]

    if input_gain is not None:
        input_gain = input_gain.to(styles.dtype).expand(n, in_ch)
    if not fused_modconv:
        x = x * (styles if input_gain is None else styles * input_gain).to(x.dtype).reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight)
        if demodulate and noise is not None:  # x·d + noise in one rounding, as the original's fma
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(n, -1, 1, 1))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1)
        return x if noise is None else x + noise.to(x.dtype)

    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [N, O, I, kh, kw]
    if demodulate:
        w = w * dcoefs.to(w.dtype).reshape(n, -1, 1, 1, 1)
    if input_gain is not None:
        w = w * input_gain.reshape(n, 1, -1, 1, 1)
    x = conv2d_resample(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, in_ch, kh, kw).to(x.dtype),
                        f=resample_filter, up=up, down=down, padding=padding, groups=n,
                        flip_weight=flip_weight)
    x = x.reshape(n, -1, *x.shape[2:])
    return x if noise is None else (x + noise).to(x.dtype)  # float16 + float32 noise: one rounding


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x · (mean(x², dim) + eps)^(-1/2): projects latents onto the sphere of radius sqrt(dim size)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def filtered_lrelu(x: torch.Tensor, fu: torch.Tensor | None = None, fd: torch.Tensor | None = None,
                   b: torch.Tensor | None = None, up: int = 1, down: int = 1, padding: Padding = 0,
                   gain: float = math.sqrt(2), slope: float = 0.2, clamp: float | None = None) -> torch.Tensor:
    """StyleGAN3's filtered leaky ReLU (Karras et al. 2021, "Alias-Free GANs", sec. 3.2 and App. D):

        y = downsample_d(fd ∗ clamp(lrelu_slope(gain · (fu ∗ pad(upsample_u(x + b)))))).

    The nonlinearity runs at `up` times the input rate so that its new high frequencies can be
    removed by `fd` before decimating. Per channel: add the bias, insert up-1 zeros after every pixel,
    pad (`padding`, on the up-sampled grid; negative crops), convolve with fu (gain up², 'valid'),
    leaky ReLU × gain, clamp to ±clamp, convolve with fd ('valid'), keep every `down`-th pixel. This
    is the definition NVlabs/stylegan3 gives for `filtered_lrelu` (its CUDA kernel fuses the same
    steps); fu/fd are 1-D (separable) or 2-D filters, None = identity.
    """
    x = bias_act(x, b)
    x = upfirdn2d(x, fu, up=up, padding=padding, gain=up * up)
    x = bias_act(x, act="lrelu", alpha=slope, gain=gain, clamp=clamp)
    return upfirdn2d(x, fd, down=down)
