"""StyleGAN2 tensor ops against hand-written references (direct loops, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gan_adapters.stylegan2_ops import (
    bias_act,
    conv2d_resample,
    downsample2d,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upfirdn2d,
    upsample2d,
)


def upfirdn2d_loop(x: np.ndarray, f: np.ndarray, up: int, down: int, pad: list[int],
                   gain: float) -> np.ndarray:
    """Direct definition: zero insertion, zero padding / cropping, true 2-D convolution, decimation."""
    n, c, h, w = x.shape
    u = np.zeros((n, c, h * up, w * up))
    u[:, :, ::up, ::up] = x
    px0, px1, py0, py1 = pad
    big = np.zeros((n, c, h * up + max(py0, 0) + max(py1, 0), w * up + max(px0, 0) + max(px1, 0)))
    big[:, :, max(py0, 0):max(py0, 0) + h * up, max(px0, 0):max(px0, 0) + w * up] = u
    big = big[:, :, max(-py0, 0):big.shape[2] - max(-py1, 0), max(-px0, 0):big.shape[3] - max(-px1, 0)]
    fh, fw = f.shape
    out = np.zeros((n, c, big.shape[2] - fh + 1, big.shape[3] - fw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            for a in range(fh):
                for b in range(fw):  # convolution: the filter is flipped
                    out[:, :, i, j] += big[:, :, i + a, j + b] * f[fh - 1 - a, fw - 1 - b] * gain
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, [0, 0, 0, 0]), (2, 1, [2, 1, 2, 1]), (1, 2, [1, 1, 1, 1]),
                                         (2, 2, [1, -1, 0, 3]), (3, 1, [-1, 2, 1, 0])])
def test_upfirdn2d_matches_direct_loop(up, down, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn([2, 3, 4, 5], generator=g, dtype=torch.float64)
    f = torch.rand([3, 4], generator=g, dtype=torch.float64)  # asymmetric: a wrong flip shows
    got = upfirdn2d(x, f, up=up, down=down, padding=pad, gain=2.0)
    want = upfirdn2d_loop(x.numpy(), f.numpy(), up, down, pad, 2.0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_upfirdn2d_separable_equals_outer_product_filter():
    x = torch.randn([1, 2, 5, 5], dtype=torch.float64)
    taps = torch.tensor([1.0, 2.0, 5.0, 1.0], dtype=torch.float64)
    a = upfirdn2d(x, taps, up=2, padding=[2, 1, 2, 1], gain=4.0)  # 1-D: applied along x then y
    b = upfirdn2d(x, torch.outer(taps, taps), up=2, padding=[2, 1, 2, 1], gain=4.0)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_setup_filter_1331():
    f = setup_filter([1, 3, 3, 1])
    assert f.dtype == torch.float32 and f.shape == (4, 4)
    assert f[0, 0] == 1 / 64 and f[0, 1] == 3 / 64 and f[1, 1] == 9 / 64 and f.sum() == 1


def test_resampling_shapes_and_dc_gain():
    """Exact output sizes; a constant image stays constant away from the zero-padded border."""
    f = setup_filter([1, 3, 3, 1])
    x = torch.full([1, 1, 8, 8], 1.5)
    up = upsample2d(x, f)
    down = downsample2d(x, f)
    assert up.shape == (1, 1, 16, 16) and down.shape == (1, 1, 4, 4)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full([1, 1, 12, 12], 1.5))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full([1, 1, 2, 2], 1.5))


def test_bias_act_gains_and_clamp():
    x = torch.tensor([[-2.0, 0.5], [1.0, -0.25]])  # [N=2, C=2]
    b = torch.tensor([0.5, -1.0])
    s2 = math.sqrt(2)
    # lrelu: slope 0.2, default gain sqrt(2)
    want = torch.tensor([[-1.5 * 0.2 * s2, -0.5 * 0.2 * s2], [1.5 * s2, -1.25 * 0.2 * s2]])
    torch.testing.assert_close(bias_act(x, b, act="lrelu"), want)
    torch.testing.assert_close(bias_act(x, b, act="lrelu", gain=3.0, clamp=1.0),
                               (want / s2 * 3.0).clamp(-1, 1))
    torch.testing.assert_close(bias_act(x, b, act="relu"), (x + b).relu() * s2)
    torch.testing.assert_close(bias_act(x, b, act="swish"), torch.sigmoid(x + b) * (x + b) * s2)
    torch.testing.assert_close(bias_act(x, b, act="tanh"), torch.tanh(x + b))
    torch.testing.assert_close(bias_act(x, None, act="linear", clamp=0.3), x.clamp(-0.3, 0.3))
    # bias along another dim
    y = torch.zeros([2, 3, 4])
    torch.testing.assert_close(bias_act(y, torch.arange(4.0), dim=2), torch.arange(4.0).expand(2, 3, 4))


def _conv2d_resample_generic(x, w, f, up, down, padding, groups, flip_weight):
    """The definition: up-sample + pad + filter (gain up²), valid convolution, filter + decimate."""
    fw = f.shape[-1]
    before, after = 0, 0
    if up > 1:
        before, after = before + (fw + up - 1) // 2, after + (fw - up) // 2
    if down > 1:
        before, after = before + (fw - down + 1) // 2, after + (fw - down) // 2
    p = [padding[0] + before, padding[1] + after, padding[2] + before, padding[3] + after]
    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=p, gain=up * up)
    x = F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups)
    return upfirdn2d(x, f, down=down) if down > 1 else x


@pytest.mark.parametrize("k,up,down,padding,groups,flip_weight", [
    (3, 2, 1, [1, 1, 1, 1], 1, False),  # SynthesisLayer conv0
    (3, 2, 1, [1, 1, 1, 1], 2, True),  # fused (grouped) form
    (1, 2, 1, [0, 0, 0, 0], 1, True),  # resnet skip
    (3, 1, 2, [1, 1, 1, 1], 1, True),  # discriminator-style down-sampling
    (3, 1, 1, [1, 1, 1, 1], 1, False),
    (3, 1, 1, [2, 0, 1, 0], 2, True),  # asymmetric padding
])
def test_conv2d_resample_matches_definition(k, up, down, padding, groups, flip_weight):
    g = torch.Generator().manual_seed(1)
    x = torch.randn([2, 4, 6, 6], generator=g, dtype=torch.float64)
    w = torch.randn([6, 4 // groups, k, k], generator=g, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1]).double()
    got = conv2d_resample(x, w, f=f, up=up, down=down, padding=padding, groups=groups,
                          flip_weight=flip_weight)
    want = _conv2d_resample_generic(x, w, f, up, down, padding, groups, flip_weight)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def _modconv_loop(x, weight, styles, noise, demodulate, padding):
    outs = []
    for n in range(x.shape[0]):
        w = weight * styles[n].reshape(1, -1, 1, 1)
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        outs.append(F.conv2d(x[n:n + 1], w, padding=padding))
    out = torch.cat(outs)
    return out if noise is None else out + noise


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv2d_matches_per_sample_loop(fused, demodulate):
    g = torch.Generator().manual_seed(2)
    x = torch.randn([3, 4, 5, 5], generator=g, dtype=torch.float64)
    weight = torch.randn([6, 4, 3, 3], generator=g, dtype=torch.float64)
    styles = torch.randn([3, 4], generator=g, dtype=torch.float64)
    noise = torch.randn([3, 1, 5, 5], generator=g, dtype=torch.float64)
    got = modulated_conv2d(x, weight, styles, noise=noise, padding=1, demodulate=demodulate,
                           fused_modconv=fused)
    want = _modconv_loop(x, weight, styles, noise, demodulate, 1)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_modulated_conv2d_float16_prenormalisation_keeps_result():
    """float16 inputs: weight/styles are rescaled against overflow; demodulation undoes it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn([2, 8, 6, 6], generator=g)
    weight = torch.randn([8, 8, 3, 3], generator=g) * 300  # would overflow float16 without rescaling
    styles = torch.randn([2, 8], generator=g) * 300
    f = setup_filter([1, 3, 3, 1])
    want = modulated_conv2d(x, weight, styles, up=2, padding=1, resample_filter=f, flip_weight=False)
    for fused in (True, False):
        got = modulated_conv2d(x.half(), weight, styles, up=2, padding=1, resample_filter=f,
                               flip_weight=False, fused_modconv=fused)
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_normalize_2nd_moment():
    x = torch.randn([5, 7]) * 3
    y = normalize_2nd_moment(x)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(5))
    torch.testing.assert_close(y / y.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True))
