"""Layers of the EDM networks (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"), written from a description of NVlabs/edm training/networks.py.

Parameter and buffer names, shapes and registration order equal the original's, so a state dict
read from an NVIDIA pickle loads 1:1 (`load_state_dict(strict=True)`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


@dataclass(frozen=True)
class Init:
    """How a layer's weights and biases are drawn: `weight_init(mode)` times `weight` / `bias`."""

    mode: str = "kaiming_normal"
    weight: float = 1.0
    bias: float = 0.0


class _Switch:
    """A process-wide setting of the layers, on for the duration of a with-block (`with switch(): ...`) and back to
    what it was after, whatever happens inside."""

    def __init__(self) -> None:
        self.on = False

    @contextlib.contextmanager
    def __call__(self, enabled: bool = True) -> Iterator[None]:
        previous, self.on = self.on, enabled
        try:
            yield
        finally:
            self.on = previous


_skip_init = _Switch()
_recompute = _Switch()
_winograd = _Switch()


def skip_init() -> contextlib.AbstractContextManager[None]:
    """Build networks without drawing weights (uninitialised memory, untouched until written): for
    networks whose weights are loaded right after construction."""
    return _skip_init()


def skipping_init() -> bool:
    """True inside `skip_init()`: layers allocate their weights without drawing them."""
    return _skip_init.on


def recompute_norms(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, while gradients are recorded, each UNetBlock stores only the inputs of its GroupNorm → SiLU
    (→ dropout) chains and recomputes their outputs in the backward (`torch.utils.checkpoint`, with the dropout
    masks' RNG state replayed): the same gradients, about 30% less activation memory (CIFAR-10 DDPM++ at batch 8:
    1245 → 877 MB saved per forward) for a second pass of those cheap operations."""
    return _recompute(enabled)


def _recomputed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """fn(*args); under `recompute_norms()` with gradients on, its intermediate results are recomputed in the
    backward instead of stored."""
    if _recompute.on and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# The layers that NNPACK's fast algorithms run faster than oneDNN's direct convolution on a 2-core AVX2 CPU
# (benchmarks/winograd.py): 3×3 kernels with at least this many channels in and out, on maps of at least this size.
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_SIZE = 16


def winograd_convs(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside, the EDM U-Nets' large float32 3×3 convolutions on the CPU run by NNPACK (Lavin & Gray 2016, "Fast
    Algorithms for Convolutional Neural Networks": Winograd's minimal filtering, F(6×6, 3×3), fewer multiplications
    per output) instead of oneDNN's direct convolution, and so does their input gradient (a 3×3 convolution too);
    their weight gradient stays torch's convolution_backward. The results differ from the direct convolution's by
    float rounding only (about 1e-5 of their scale), as under cuDNN's benchmark mode on a GPU. Where NNPACK is not
    available (no AVX2) nothing changes."""
    return _winograd(enabled and torch.backends.nnpack.is_available())


def winograd_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `conv_same(x, w)` runs by NNPACK: under `winograd_convs()`, a float32 CPU convolution with a 3×3
    kernel, at least WINOGRAD_MIN_CHANNELS channels in and out and a map of at least WINOGRAD_MIN_SIZE a side."""
    return (_winograd.on and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and w.shape[-2:] == (3, 3) and min(w.shape[:2]) >= WINOGRAD_MIN_CHANNELS
            and min(x.shape[-2:]) >= WINOGRAD_MIN_SIZE)


def nnpack_conv3x3(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x ⋆ w (+ b) for a 3×3 kernel, padding 1, by NNPACK's Winograd kernel (NNPACK initialised: `winograd_convs`)."""
    return torch._nnpack_spatial_convolution(x.contiguous(), w.contiguous(), b, [1, 1])


def adjoint(w: torch.Tensor) -> torch.Tensor:
    """w̃[i, o] = w[o, i] flipped in both spatial axes: a stride-1 same-padded convolution's input gradient is the
    output gradient convolved with w̃."""
    return w.flip(2, 3).transpose(0, 1)


class _WinogradConv(torch.autograd.Function):
    """y = x ⋆ w for a 3×3 kernel, padding 1, stride 1, by NNPACK's Winograd kernel, and its input gradient by
    the same kernel: for such a convolution ∂L/∂x = (∂L/∂y) ⋆ w̃ with w̃[i, o] = w[o, i] flipped in both spatial
    axes (the adjoint of a same-padded correlation), a 3×3 convolution with the channel counts swapped, so the
    layers NNPACK takes forward it takes backward too. ∂L/∂w is torch's convolution_backward (oneDNN)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return nnpack_conv3x3(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        grad_x = nnpack_conv3x3(grad, adjoint(w)) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            bias_sizes = [w.shape[0]] if ctx.has_bias else None
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, w, bias_sizes, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b


def conv_same(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, w, b, padding=k // 2) for a k×k kernel w; by NNPACK, forward and input gradient, where
    `winograd_takes` it (`_WinogradConv`)."""
    if winograd_takes(x, w):
        return _WinogradConv.apply(x, w, b)
    return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int, gain: float = 1.0
                ) -> torch.Tensor:
    """gain × Glorot ("xavier", variance 2/(fan_in+fan_out)) or He ("kaiming", variance 1/fan_in) draws,
    uniform on [−√(3v), √(3v)] or normal with std √v."""
    if mode not in INIT_MODES:
        raise ValueError(f"unknown init mode {mode!r}; expected one of {INIT_MODES}")
    if _skip_init.on:
        return torch.empty(*shape)
    var = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    if mode.endswith("uniform"):
        return gain * math.sqrt(3 * var) * (torch.rand(*shape) * 2 - 1)
    return gain * math.sqrt(var) * torch.randn(*shape)


class Linear(nn.Module):
    """y = x Wᵀ + b, weights cast to the input's dtype (fp16/bf16 execution keeps fp32 master weights)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init = Init()):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init.mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans, gain=init.weight))
        self.bias = nn.Parameter(weight_init([out_features], **fans, gain=init.bias)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR filter [1, 1, k, k] = outer(f, f) / (Σf)², so it sums to 1. Made on the CPU
    also while a network is built on the meta device (computing it there is slow)."""
    f = torch.as_tensor(taps, dtype=torch.float32, device="cpu")
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """Convolution with optional 2x up/downsampling by an FIR filter.

    kernel 0 means "resample only" (no weight, no bias). Unfused: upsample (transposed depthwise
    convolution with 4·filter, stride 2) or downsample (depthwise filter, stride 2) first, then the
    convolution. Fused (used by the NCSN++ residual encoder): convolve first with the filter's padding
    added, then filter with stride 2 (down), or upsample first with the padding difference (up).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init: Init = Init()):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init.mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fans, gain=init.weight)) if kernel else None
        has_bias = kernel and bias
        self.bias = nn.Parameter(weight_init([out_channels], **fans, gain=init.bias)) if has_bias else None
        self.register_buffer("resample_filter", resample_kernel(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        def upsample(x: torch.Tensor, pad: int) -> torch.Tensor:
            c = x.shape[1]
            return F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

        def downsample(x: torch.Tensor, pad: int) -> torch.Tensor:
            c = x.shape[1]
            return F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

        # The bias goes into the convolution where the convolution comes last (one pass over the output fewer);
        # the fused downsampling filters after it, so there it is added afterwards, as in EDM.
        if self.fused_resample and self.up and w is not None:
            return F.conv2d(upsample(x, max(f_pad - w_pad, 0)), w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            x = downsample(F.conv2d(x, w, padding=w_pad + f_pad), 0)
            return x + b.reshape(1, -1, 1, 1) if b is not None else x
        if self.up:
            x = upsample(x, f_pad)
        if self.down:
            x = downsample(x, f_pad)
        return conv_same(x, w, b) if w is not None else x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(qᵀk / √c) applied to v, for q, k, v of shape [B, c, L]; returns [B, c, L].

    PyTorch's scaled_dot_product_attention. With these 3-D views it takes its math path on every device: the flash
    and memory-efficient CUDA kernels take only 4-D inputs with a contiguous last dimension (README "Status and
    known limits"). The original (NVlabs/edm training/networks.py, AttentionOp) computes the weights in float32
    and rounds them to the inputs' dtype before multiplying with v; this equals it to float32 rounding, and is as
    accurate in bf16 / fp16 (tests/test_attention.py)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@dataclass(frozen=True)
class BlockConfig:
    """Settings shared by every UNetBlock of one network (DDPM++/NCSN++ vs ADM)."""

    emb_channels: int
    num_heads: int | None = None  # None: out_channels // channels_per_head
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: Sequence[float] = (1, 1)
    resample_proj: bool = False  # 1x1 projection on the skip path of up/down blocks
    adaptive_scale: bool = True  # embedding gives scale and shift (ADM) instead of a bias
    init: Init = Init()
    init_zero: Init = Init(weight=0.0)
    init_attn: Init | None = None  # None: `init`


class UNetBlock(nn.Module):
    """Residual block with optional up/downsampling and self-attention (union of DDPM++, NCSN++, ADM):

        h = conv1(dropout(silu(norm1(conv0(silu(norm0(x)))) ⊙ (1 + scale) + shift)))   (adaptive)
        h = conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + affine(emb)))))            (otherwise)
        x = (h + skip(x)) · skip_scale;  with attention: x = (proj(attn(qkv(norm2(x)))) + x) · skip_scale
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: BlockConfig, up: bool = False,
                 down: bool = False, attention: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        heads = cfg.num_heads if cfg.num_heads is not None else out_channels // cfg.channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = cfg.dropout
        self.skip_scale = cfg.skip_scale
        self.adaptive_scale = cfg.adaptive_scale

        resample = dict(up=up, down=down, resample_filter=cfg.resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=cfg.eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, init=cfg.init, **resample)
        self.affine = Linear(cfg.emb_channels, out_channels * (2 if cfg.adaptive_scale else 1), init=cfg.init)
        self.norm1 = GroupNorm(out_channels, eps=cfg.eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init=cfg.init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if cfg.resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, init=cfg.init, **resample)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=cfg.eps)
            init_attn = cfg.init_attn if cfg.init_attn is not None else cfg.init
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, init=init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init=cfg.init_zero)

    def _activate0(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm0(x))

    def _activate1(self, x: torch.Tensor, params: torch.Tensor, training: bool) -> torch.Tensor:
        """`training`: the pass's mode, an argument so that a recomputation in the backward drops out as the pass
        did, whatever mode the block is in by then (the official recipe puts the teacher back into eval mode
        before the generator's backward runs through it)."""
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        return F.dropout(x, p=self.dropout, training=training)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(_recomputed(self._activate0, x))
        params = self.affine(emb)
        params = params.reshape(*params.shape, 1, 1).to(x.dtype)  # one view op (indexing with None: two, and two back)
        x = self.conv1(_recomputed(self._activate1, x, params, self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            # qkv channels are laid out as [head, channel, (q, k, v)].
            n, c, heads = x.shape[0], x.shape[1], self.num_heads
            q, k, v = self.qkv(self.norm2(x)).reshape(n * heads, c // heads, 3, -1).unbind(2)
            x = (self.proj(attention(q, k, v).reshape(x.shape)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding [cos(x·ω_j), sin(x·ω_j)], ω_j = (1/max_positions)^(j/(C/2 − e)),
    j < C/2, e = 1 with `endpoint` (DDPM++) else 0 (ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π x f_j), sin(2π x f_j)], f_j ~ N(0, scale²) fixed (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        # not drawn under skip_init (the stored values follow; random draws on the meta device are slow)
        self.register_buffer("freqs", torch.empty(num_channels // 2) if _skip_init.on
                             else torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
