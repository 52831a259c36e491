"""Clean-room StyleGAN3 generator, configs T and R (Karras et al. 2021, "Alias-Free Generative Adversarial
Networks", NVlabs/stylegan3 `training/networks_stylegan3.py`).

Module, parameter and buffer names equal the original's, so a pickle's `G_ema.state_dict()` loads 1:1:
`mapping.*` (the StyleGAN2 mapping network, 2 layers by default, reused from gan_adapters/stylegan2.py),
`synthesis.input.{weight, affine.*, transform, freqs, phases}` and one `synthesis.L{i}_{size}_{channels}`
per layer with `weight, bias, magnitude_ema, up_filter, down_filter, affine.*`.

Network (paper sec. 3 and App. F): ws[0] drives the Fourier-feature input, ws[1 + i] layer i.
- Layer i has cutoff f_c, minimum stopband f_t, sampling rate s and transition half-width f_h:
  f_c and f_t grow geometrically from `first_cutoff` / `first_stopband` to img_resolution/2 and
  img_resolution/2 · last_stopband_rel over the first N - num_critical layers and stay there;
  s = 2^ceil(log2(min(2 f_t, img_resolution))), f_h = max(f_t, s/2) - f_c; the feature maps carry
  `margin_size` extra pixels each side (the last two layers: exactly img_resolution);
  channels = rint(min(channel_base/2 / f_c, channel_max)).
- Each layer: modulated convolution (demodulated, input scaled by 1/sqrt(magnitude_ema)), then
  `filtered_lrelu`: up-sample to 2·max(s_in, s_out) with a Kaiser low-pass at f_c,in, bias + lrelu ·
  sqrt(2) + clamp, low-pass at f_c,out (config R: a radial jinc filter) and decimate to s_out. The last
  layer (ToRGB) is a 1x1 modulated convolution without demodulation, bias and clamp only.
- The output is multiplied by `output_scale` (0.25).
Buffers (filters, magnitude_ema, freqs, phases, transform) come from the file; the filters are
designed here too (scipy), so a network built from its kwargs alone matches. magnitude_ema is not
updated (the original only updates it when asked, during discriminator steps); noise_mode is accepted
and ignored, as in the original.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from gan_adapters.stylegan2 import NOISE_MODES, FullyConnectedLayer, StyleGANNetwork
from gan_adapters.stylegan2_ops import filtered_lrelu, modulated_conv2d


@dataclass
class StyleGAN3MappingConfig:
    """`mapping_kwargs` of the original (its MappingNetwork has no embedding/width options)."""

    num_layers: int = 2
    lr_multiplier: float = 0.01
    w_avg_beta: float = 0.998


@dataclass
class StyleGAN3Config:
    """The original Generator's constructor arguments (synthesis and layer arguments are flat kwargs)."""

    z_dim: int
    c_dim: int
    w_dim: int
    img_resolution: int
    img_channels: int
    mapping: StyleGAN3MappingConfig = field(default_factory=StyleGAN3MappingConfig)
    channel_base: int = 32768
    channel_max: int = 512
    num_layers: int = 14
    num_critical: int = 2
    first_cutoff: float = 2
    first_stopband: float = 2 ** 2.1
    last_stopband_rel: float = 2 ** 0.3
    margin_size: int = 10
    output_scale: float = 0.25
    num_fp16_res: int = 4
    conv_kernel: int = 3
    filter_size: int = 6
    lrelu_upsampling: int = 2
    use_radial_filters: bool = False
    conv_clamp: float | None = 256
    magnitude_ema_beta: float = 0.999

    _POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs")

    @classmethod
    def from_init_kwargs(cls, args: Sequence[Any] = (), kwargs: dict | None = None) -> StyleGAN3Config:
        """Rebuild the config from the original constructor's (args, kwargs); raises ValueError naming
        any argument the original does not have."""
        given = dict(zip(cls._POSITIONAL, args))
        given.update(kwargs or {})
        names = {f.name for f in fields(cls)} - {"mapping"}
        unknown = set(given) - names - {"mapping_kwargs"}
        missing = set(cls._POSITIONAL[:5]) - set(given)
        if unknown or missing:
            raise ValueError(f"unexpected StyleGAN3 Generator arguments {sorted(unknown)}, missing {sorted(missing)}")
        mapping = dict(given.pop("mapping_kwargs", None) or {})
        bad = set(mapping) - {f.name for f in fields(StyleGAN3MappingConfig)}
        if bad:
            raise ValueError(f"unexpected StyleGAN3 mapping arguments {sorted(bad)}")
        return cls(mapping=StyleGAN3MappingConfig(**mapping), **given)

    @property
    def config_name(self) -> str:
        """'R' (1x1 convolutions, radial filters) or 'T' (translation equivariant)."""
        return "R" if self.conv_kernel == 1 and self.use_radial_filters else "T"


@dataclass(frozen=True)
class LayerSpec:
    """Sampling parameters of one synthesis layer (input side `in_*`, output side `out_*`)."""

    name: str
    is_torgb: bool
    is_critically_sampled: bool
    use_fp16: bool
    in_channels: int
    out_channels: int
    in_size: int
    out_size: int
    in_sampling_rate: int
    out_sampling_rate: int
    in_cutoff: float
    out_cutoff: float
    in_half_width: float
    out_half_width: float


def layer_specs(cfg: StyleGAN3Config) -> list[LayerSpec]:
    """The per-layer schedule of Karras et al. 2021 App. F (module docstring), in float64 as the original."""
    n = cfg.num_layers
    last_cutoff = cfg.img_resolution / 2
    last_stopband = last_cutoff * cfg.last_stopband_rel
    exponents = np.minimum(np.arange(n + 1) / (n - cfg.num_critical), 1)
    cutoffs = cfg.first_cutoff * (last_cutoff / cfg.first_cutoff) ** exponents
    stopbands = cfg.first_stopband * (last_stopband / cfg.first_stopband) ** exponents
    rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, cfg.img_resolution))))
    half_widths = np.maximum(stopbands, rates / 2) - cutoffs
    sizes = rates + cfg.margin_size * 2
    sizes[-2:] = cfg.img_resolution
    channels = np.rint(np.minimum((cfg.channel_base / 2) / cutoffs, cfg.channel_max))
    channels[-1] = cfg.img_channels
    specs = []
    for i in range(n + 1):
        p = max(i - 1, 0)
        specs.append(LayerSpec(
            name=f"L{i}_{int(sizes[i])}_{int(channels[i])}", is_torgb=i == n,
            is_critically_sampled=i >= n - cfg.num_critical,
            use_fp16=bool(rates[i] * 2 ** cfg.num_fp16_res > cfg.img_resolution),
            in_channels=int(channels[p]), out_channels=int(channels[i]), in_size=int(sizes[p]),
            out_size=int(sizes[i]), in_sampling_rate=int(rates[p]), out_sampling_rate=int(rates[i]),
            in_cutoff=float(cutoffs[p]), out_cutoff=float(cutoffs[i]),
            in_half_width=float(half_widths[p]), out_half_width=float(half_widths[i])))
    return specs


def design_lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float,
                          radial: bool = False) -> torch.Tensor | None:
    """Windowed low-pass FIR (None for 1 tap). Separable: Kaiser-windowed sinc with transition `width`
    (scipy.signal.firwin). Radial: jinc J1(2π f_c r)/(π r) on the 2-D tap grid times the outer product
    of a Kaiser window whose β meets the same transition width, normalised to sum 1."""
    import scipy.signal  # slow to import; only needed to build a network
    import scipy.special

    if numtaps == 1:
        return None
    if not radial:
        return torch.as_tensor(scipy.signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs),
                               dtype=torch.float32)
    t = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = np.hypot(*np.meshgrid(t, t))
    f = scipy.special.j1(2 * cutoff * (np.pi * r)) / (np.pi * r)
    beta = scipy.signal.kaiser_beta(scipy.signal.kaiser_atten(numtaps, width / (fs / 2)))
    window = np.kaiser(numtaps, beta)
    f *= np.outer(window, window)
    return torch.as_tensor(f / np.sum(f), dtype=torch.float32)


class SynthesisInput(torch.nn.Module):
    """Fourier features (paper sec. 3.1): channels sin(2π(⟨f_c, T(x)⟩ + φ_c)) on a grid, where T is the
    rotation/translation predicted from ws[0] (then the stored user `transform`), damped where a
    transformed frequency leaves the band, then mixed by a learned [C, C] matrix (gain 1/sqrt(C))."""

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float):
        super().__init__()
        self.w_dim = w_dim
        self.channels = channels
        self.size = (size, size)  # width, height
        self.sampling_rate = sampling_rate
        self.bandwidth = bandwidth
        freqs = torch.randn([channels, 2])  # uniform in the disc of radius `bandwidth`
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs = freqs / (radii * radii.square().exp().pow(0.25)) * bandwidth
        self.weight = torch.nn.Parameter(torch.randn([channels, channels]))
        self.affine = FullyConnectedLayer(w_dim, 4)
        with torch.no_grad():  # starts as the identity transform
            self.affine.weight.zero_()
            self.affine.bias.copy_(torch.tensor([1.0, 0, 0, 0]))
        self.register_buffer("transform", torch.eye(3))
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", torch.rand([channels]) - 0.5)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = self.affine(w)
        t = t / t[:, :2].norm(dim=1, keepdim=True)  # (cos, sin, tx, ty) with a unit rotation
        cos, sin, tx, ty = t.unbind(dim=1)
        zero, one = torch.zeros_like(cos), torch.ones_like(cos)
        rotation = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], dim=1).reshape(-1, 3, 3)
        translation = torch.stack([one, zero, -tx, zero, one, -ty, zero, zero, one], dim=1).reshape(-1, 3, 3)
        transform = rotation @ translation @ self.transform  # inverse maps of the output image
        phases = self.phases + (self.freqs @ transform[:, :2, 2:]).squeeze(2)  # [N, C]
        freqs = self.freqs @ transform[:, :2, :2]  # [N, C, 2]
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth)
                      / (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)
        # pixel centres in units of the sampling period, centred on the image
        width, height = self.size
        gx = (torch.arange(width, device=w.device, dtype=torch.float32) + 0.5 - width / 2) / self.sampling_rate
        gy = (torch.arange(height, device=w.device, dtype=torch.float32) + 0.5 - height / 2) / self.sampling_rate
        x = (gx[None, None, :, None] * freqs[:, None, None, :, 0]
             + gy[None, :, None, None] * freqs[:, None, None, :, 1])  # [N, H, W, C]
        x = torch.sin((x + phases[:, None, None, :]) * (2 * math.pi)) * amplitudes[:, None, None, :]
        x = x @ (self.weight / math.sqrt(self.channels)).t()
        return x.permute(0, 3, 1, 2)


class SynthesisLayer(torch.nn.Module):
    """Modulated convolution + filtered leaky ReLU between two sampling rates (module docstring)."""

    def __init__(self, w_dim: int, spec: LayerSpec, conv_kernel: int = 3, filter_size: int = 6,
                 lrelu_upsampling: int = 2, use_radial_filters: bool = False, conv_clamp: float | None = 256):
        super().__init__()
        self.spec = spec
        self.is_torgb = spec.is_torgb
        self.use_fp16 = spec.use_fp16
        self.conv_kernel = 1 if spec.is_torgb else conv_kernel
        self.conv_clamp = conv_clamp
        self.in_channels = spec.in_channels
        self.affine = FullyConnectedLayer(w_dim, spec.in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([spec.out_channels, spec.in_channels,
                                                      self.conv_kernel, self.conv_kernel]))
        self.bias = torch.nn.Parameter(torch.zeros([spec.out_channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))

        tmp_rate = max(spec.in_sampling_rate, spec.out_sampling_rate) * (1 if spec.is_torgb else lrelu_upsampling)
        self.up_factor = int(np.rint(tmp_rate / spec.in_sampling_rate))
        self.down_factor = int(np.rint(tmp_rate / spec.out_sampling_rate))
        up_taps = filter_size * self.up_factor if self.up_factor > 1 and not spec.is_torgb else 1
        down_taps = filter_size * self.down_factor if self.down_factor > 1 and not spec.is_torgb else 1
        self.register_buffer("up_filter", design_lowpass_filter(
            up_taps, spec.in_cutoff, spec.in_half_width * 2, tmp_rate))
        self.register_buffer("down_filter", design_lowpass_filter(
            down_taps, spec.out_cutoff, spec.out_half_width * 2, tmp_rate,
            radial=use_radial_filters and not spec.is_critically_sampled))
        # Padding that makes the output exactly out_size, split so that sample positions stay centred
        # (the symmetric interpretation, paper App. C.3).
        total = ((spec.out_size - 1) * self.down_factor + 1
                 - (spec.in_size + self.conv_kernel - 1) * self.up_factor + up_taps + down_taps - 2)
        lo = (total + self.up_factor) // 2
        self.padding = [lo, total - lo, lo, total - lo]

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random",
                force_fp32: bool = False) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        styles = self.affine(w)
        if self.is_torgb:
            styles = styles / math.sqrt(self.in_channels * self.conv_kernel ** 2)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        x = modulated_conv2d(x.to(dtype), self.weight, styles, padding=self.conv_kernel - 1,
                             demodulate=not self.is_torgb, input_gain=self.magnitude_ema.rsqrt())
        return filtered_lrelu(x, self.up_filter, self.down_filter, self.bias.to(x.dtype), up=self.up_factor,
                              down=self.down_factor, padding=self.padding,
                              gain=1 if self.is_torgb else math.sqrt(2), slope=1 if self.is_torgb else 0.2,
                              clamp=self.conv_clamp)


class SynthesisNetwork(torch.nn.Module):
    """ws [N, num_layers + 2, w_dim] -> image [N, img_channels, R, R] (float32)."""

    def __init__(self, cfg: StyleGAN3Config):
        super().__init__()
        self.w_dim = cfg.w_dim
        self.img_resolution = cfg.img_resolution
        self.img_channels = cfg.img_channels
        self.num_ws = cfg.num_layers + 2
        self.output_scale = cfg.output_scale
        specs = layer_specs(cfg)
        first = specs[0]
        self.input = SynthesisInput(cfg.w_dim, first.in_channels, first.in_size, first.in_sampling_rate,
                                    first.in_cutoff)
        self.layer_names = [spec.name for spec in specs]
        for spec in specs:
            setattr(self, spec.name, SynthesisLayer(
                cfg.w_dim, spec, conv_kernel=cfg.conv_kernel, filter_size=cfg.filter_size,
                lrelu_upsampling=cfg.lrelu_upsampling, use_radial_filters=cfg.use_radial_filters,
                conv_clamp=cfg.conv_clamp))

    def layers(self) -> list[SynthesisLayer]:
        return [getattr(self, name) for name in self.layer_names]

    def forward(self, ws: torch.Tensor, noise_mode: str = "random", force_fp32: bool = False) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        ws = ws.to(torch.float32).unbind(dim=1)
        x = self.input(ws[0])
        for layer, w in zip(self.layers(), ws[1:]):
            x = layer(x, w, noise_mode=noise_mode, force_fp32=force_fp32)
        if self.output_scale != 1:
            x = x * self.output_scale
        return x.to(torch.float32)


class StyleGAN3Network(StyleGANNetwork):
    """The full StyleGAN3 generator network (NVIDIA's `training.networks_stylegan3.Generator`)."""

    def __init__(self, cfg: StyleGAN3Config):
        m = cfg.mapping
        super().__init__(cfg, SynthesisNetwork(cfg), dict(num_layers=m.num_layers, lr_multiplier=m.lr_multiplier,
                                                          w_avg_beta=m.w_avg_beta))

    def summary(self) -> str:
        """Family and architecture in a few words (for `describe`)."""
        fp16 = sum(layer.use_fp16 for layer in self.synthesis.layers())
        return (f"StyleGAN3-{self.cfg.config_name} generator {self.img_resolution}x{self.img_resolution}x"
                f"{self.img_channels}, {self.cfg.num_layers} layers + ToRGB, {fp16} float16 layers (CUDA only), "
                f"conv_clamp {self.cfg.conv_clamp}")
