"""Clean-room StyleGAN2-ADA generator (Karras et al. 2020, "Training GANs with limited data").

Module, parameter and buffer names equal those of stylegan2-ada-pytorch's `training/networks.py`, so
a pickle's `G_ema.state_dict()` loads 1:1 (docs/pickle_formats.md §2.1-2.3). Construction takes
a `GeneratorConfig`, built from the pickle's `_init_kwargs` with the original defaults filled in.

The same network, with the same names, is NVlabs/stylegan3's StyleGAN2 config
(`training/networks_stylegan2.py`). Only its bookkeeping differs (`GeneratorConfig.repo`): the
synthesis arguments are flat `Generator` kwargs instead of a `synthesis_kwargs` dict; the defaults
are num_fp16_res 4, conv_clamp 256 and w_avg_beta 0.998 (stylegan2-ada-pytorch: 0, None, 0.995);
float16 blocks run only on CUDA (on the CPU it computes in float32); `fused_modconv_default` only
chooses between two equal ways of computing a layer.

Forward semantics kept from the original:
- mapping: z -> normalize_2nd_moment -> (concat the normalised label embedding) -> FC layers with
  learning-rate multiplier -> broadcast to num_ws -> truncation w_avg + psi·(w - w_avg) (optionally
  only for the first `truncation_cutoff` ws). w_avg ← lerp(mean_batch(w), w_avg, beta) in training mode.
- synthesis: block i reads ws[idx : idx + num_conv + num_torgb] and idx advances by num_conv, so a
  block's ToRGB shares its w with the next block's first convolution.
- a block with `use_fp16` runs in float16 unless `force_fp32` (on any device, as the original);
  the float16 guards are modulated_conv2d's pre-normalisation and `conv_clamp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from gan_adapters.stylegan2_ops import (
    ACTIVATIONS,
    bias_act,
    conv2d_resample,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upsample2d,
)

NOISE_MODES = ("random", "const", "none")
ARCHITECTURES = ("orig", "skip", "resnet")
SG2ADA_REPO = "stylegan2-ada-pytorch"
SG3_REPO = "stylegan3"  # NVlabs/stylegan3's training/networks_stylegan2.py


# ------------------------------------------------------------------------------------------------
# Configuration: the original constructor arguments and their defaults.

@dataclass
class MappingConfig:
    """`mapping_kwargs` of the original Generator (MappingNetwork defaults)."""

    num_layers: int = 8
    embed_features: int | None = None  # None = w_dim
    layer_features: int | None = None  # None = w_dim
    activation: str = "lrelu"
    lr_multiplier: float = 0.01
    w_avg_beta: float | None = 0.995  # None = no w_avg buffer (no truncation possible)


@dataclass
class SynthesisConfig:
    """`synthesis_kwargs` of the original Generator (SynthesisNetwork / SynthesisBlock / SynthesisLayer)."""

    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0  # float16 for the N highest resolutions (never below 8x8)
    architecture: str = "skip"
    resample_filter: Sequence[float] = (1, 3, 3, 1)
    conv_clamp: float | None = None
    fp16_channels_last: bool = False  # memory layout only; results do not depend on it
    fused_modconv_default: bool | str = True  # NVlabs/stylegan3 only; fused or not gives the same result
    kernel_size: int = 3
    use_noise: bool = True
    activation: str = "lrelu"

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)


@dataclass
class GeneratorConfig:
    z_dim: int
    c_dim: int
    w_dim: int
    img_resolution: int
    img_channels: int
    mapping: MappingConfig = field(default_factory=MappingConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    repo: str = SG2ADA_REPO  # whose code wrote the file (module docstring)

    _POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs",
                   "synthesis_kwargs")
    _REPO_DEFAULTS = {SG2ADA_REPO: ({}, {}), SG3_REPO: ({"w_avg_beta": 0.998}, {"num_fp16_res": 4, "conv_clamp": 256})}
    _SG3_ONLY = ("fused_modconv_default",)  # synthesis arguments stylegan2-ada-pytorch does not have

    @classmethod
    def from_init_kwargs(cls, args: Sequence[Any] = (), kwargs: dict | None = None,
                         repo: str = SG2ADA_REPO) -> GeneratorConfig:
        """Rebuild the config from the original constructor's (args, kwargs); that repository's defaults
        fill the rest. stylegan3's Generator takes the synthesis arguments as flat **kwargs.

        Raises ValueError naming any argument the original does not have.
        """
        given = dict(zip(cls._POSITIONAL[:6], args))
        given.update(kwargs or {})
        if repo == SG3_REPO:
            flat = {k: given.pop(k) for k in list(given) if k not in cls._POSITIONAL[:6]}
            given["synthesis_kwargs"] = flat
        unknown = set(given) - set(cls._POSITIONAL)
        if repo == SG2ADA_REPO:
            unknown |= set(given.get("synthesis_kwargs") or {}) & set(cls._SG3_ONLY)
        missing = set(cls._POSITIONAL[:5]) - set(given)
        if unknown or missing:
            raise ValueError(f"unexpected Generator arguments {sorted(unknown)}, missing {sorted(missing)}")
        mapping_defaults, synthesis_defaults = cls._REPO_DEFAULTS[repo]
        return cls(**{k: given[k] for k in cls._POSITIONAL[:5]},
                   mapping=_dataclass_from(MappingConfig, {**mapping_defaults, **(given.get("mapping_kwargs") or {})}),
                   synthesis=_dataclass_from(SynthesisConfig,
                                             {**synthesis_defaults, **(given.get("synthesis_kwargs") or {})}),
                   repo=repo)

    def to_init_kwargs(self) -> dict:
        """The original constructor's kwargs (full, defaults included), in the layout of `repo`."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("mapping", "synthesis", "repo")}
        synthesis = asdict(self.synthesis)
        if self.repo == SG3_REPO:
            return dict(out, mapping_kwargs=asdict(self.mapping), **synthesis)
        synthesis = {k: v for k, v in synthesis.items() if k not in self._SG3_ONLY}
        return dict(out, mapping_kwargs=asdict(self.mapping), synthesis_kwargs=synthesis)


def _dataclass_from(cls: type, kwargs: dict) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(kwargs) - names
    if unknown:
        raise ValueError(f"unexpected {cls.__name__} arguments {sorted(unknown)}")
    return cls(**dict(kwargs))


# ------------------------------------------------------------------------------------------------
# Layers.

class FullyConnectedLayer(torch.nn.Module):
    """y = act(x · (weight · lr/sqrt(in))ᵀ + bias · lr): the equalised learning rate of ProGAN.

    The stored weight is N(0, 1)/lr at init, so the effective weight starts as N(0, 1/in).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None
        if self.bias is not None:
            b = self.bias.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class Conv2dLayer(torch.nn.Module):
    """Convolution (weight · 1/sqrt(fan_in)) with optional up/down-sampling, then bias_act with clamp.

    In the generator only the 'resnet' skip connection uses it (1x1, up=2, no bias).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1,
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None):
        super().__init__()
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = ACTIVATIONS[activation].def_gain
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, f=self.resample_filter, up=self.up, down=self.down, padding=self.padding,
                            flip_weight=(self.up == 1))
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class MappingNetwork(torch.nn.Module):
    """z (and label c) -> w, broadcast to [N, num_ws, w_dim], with truncation toward w_avg."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None,
                 activation: str = "lrelu", lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = 0 if c_dim == 0 else (w_dim if embed_features is None else embed_features)
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnectedLayer(features[i], features[i + 1], activation=activation,
                                                        lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, skip_w_avg_update: bool = False) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            parts.append(normalize_2nd_moment(self.embed(c.to(torch.float32))))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)

        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            with torch.no_grad():
                batch_mean = x.detach().to(self.w_avg.dtype).mean(dim=0)
                self.w_avg.copy_(batch_mean.lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg; this mapping network has none (w_avg_beta=None)")
            truncated = self.w_avg.to(x.dtype).lerp(x, truncation_psi)  # w_avg + psi · (w - w_avg)
            if self.num_ws is None or truncation_cutoff is None:
                x = truncated
            else:
                x = torch.cat([truncated[:, :truncation_cutoff], x[:, truncation_cutoff:]], dim=1)
        return x


class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 convolution (optionally 2x up-sampling), + noise · noise_strength, + bias, lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None):
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation].def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random",
                fused_modconv: bool = True, gain: float = 1.0) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
            noise = noise * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                             fused_modconv=fused_modconv)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 convolution without demodulation (styles · 1/sqrt(in)), + bias, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(torch.nn.Module):
    """One resolution: (const | conv0 up 2x) -> conv1 -> ToRGB, wired as 'orig', 'skip' or 'resnet'.

    - orig: only the last block has ToRGB; the image is that block's output.
    - skip: every block has ToRGB; img = upsample2d(previous img) + torgb(x).
    - resnet: x = skip(x)·sqrt(1/2) + conv1(conv0(x))·sqrt(1/2) (skip = 1x1 up-sampling, no bias);
      only the last block has ToRGB.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter: Sequence[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, use_fp16: bool = False, **layer_kwargs: Any):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                        up=2, resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                force_fp32: bool = False, fused_modconv: bool | None = None,
                noise_mode: str = "random") -> tuple[torch.Tensor, torch.Tensor | None]:
        w_iter = iter(ws.unbind(dim=1))
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        if fused_modconv is None:
            # Either way gives the same result; the fused form is faster for inference.
            fused_modconv = (not self.training) and (dtype == torch.float32 or ws.shape[0] == 1)
        kw = dict(fused_modconv=fused_modconv, noise_mode=noise_mode)

        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), **kw)
        elif self.architecture == "resnet":
            x = x.to(dtype)
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), **kw)
            x = y + self.conv1(x, next(w_iter), gain=math.sqrt(0.5), **kw)
        else:
            x = self.conv0(x.to(dtype), next(w_iter), **kw)
            x = self.conv1(x, next(w_iter), **kw)

        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = y if img is None else img + y
        return x, img


class SynthesisNetwork(torch.nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R] (float32), blocks b4 ... bR."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, cfg: SynthesisConfig,
                 fp16_cuda_only: bool = False):
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.fp16_cuda_only = fp16_cuda_only  # NVlabs/stylegan3: float16 blocks compute in float32 off CUDA
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - cfg.num_fp16_res), 8)
        layer_kwargs = dict(kernel_size=cfg.kernel_size, use_noise=cfg.use_noise, activation=cfg.activation)
        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(cfg.channels(res // 2) if res > 4 else 0, cfg.channels(res), w_dim=w_dim,
                                   resolution=res, img_channels=img_channels, is_last=is_last,
                                   architecture=cfg.architecture, resample_filter=cfg.resample_filter,
                                   conv_clamp=cfg.conv_clamp, use_fp16=res >= fp16_resolution, **layer_kwargs)
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def forward(self, ws: torch.Tensor, noise_mode: str = "random", force_fp32: bool = False,
                fused_modconv: bool | None = None) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        ws = ws.to(torch.float32)
        force_fp32 = force_fp32 or (self.fp16_cuda_only and ws.device.type != "cuda")
        x = img = None
        w_idx = 0
        for block in self.blocks():
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, force_fp32=force_fp32, fused_modconv=fused_modconv,
                           noise_mode=noise_mode)
        return img


class StyleGANNetwork(torch.nn.Module):
    """What the StyleGAN2 and StyleGAN3 generator networks share (NVIDIA's `Generator` of
    training/networks.py and training/networks_stylegan3.py): the sizes as attributes, the children
    `synthesis` then `mapping` (the original's order; mapping gets num_ws from synthesis), and
    forward(z, c, truncation_psi, truncation_cutoff, noise_mode, force_fp32, ...) = synthesis(mapping(z, c))."""

    def __init__(self, cfg: Any, synthesis: torch.nn.Module, mapping_kwargs: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.c_dim = cfg.c_dim
        self.w_dim = cfg.w_dim
        self.img_resolution = cfg.img_resolution
        self.img_channels = cfg.img_channels
        self.synthesis = synthesis
        self.num_ws = synthesis.num_ws
        self.mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, cfg.w_dim, num_ws=self.num_ws, **mapping_kwargs)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, noise_mode: str = "random", force_fp32: bool = False,
                **synthesis_kwargs: Any) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, **synthesis_kwargs)


class StyleGAN2Network(StyleGANNetwork):
    """The full StyleGAN2 generator network, NVIDIA's `training.networks.Generator` (the class name its pickles
    keep); forward also takes `fused_modconv`."""

    def __init__(self, cfg: GeneratorConfig):
        synthesis = SynthesisNetwork(cfg.w_dim, cfg.img_resolution, cfg.img_channels, cfg.synthesis,
                                     fp16_cuda_only=cfg.repo == SG3_REPO)
        super().__init__(cfg, synthesis, asdict(cfg.mapping))

    def summary(self) -> str:
        """Family and architecture in a few words (for `describe`)."""
        s = self.cfg.synthesis
        fp16 = [f"b{b.resolution}" for b in self.synthesis.blocks() if b.use_fp16]
        family = "StyleGAN2-ADA" if self.cfg.repo == SG2ADA_REPO else "StyleGAN2 (NVlabs/stylegan3)"
        return (f"{family} generator {self.img_resolution}x{self.img_resolution}x{self.img_channels}, "
                f"architecture {s.architecture}, float16 blocks {','.join(fp16) if fp16 else 'none'}, "
                f"conv_clamp {s.conv_clamp}")
