"""BigGAN-deep (Brock et al. 2019) in the folder format of pytorch-pretrained-biggan 0.1.1.

A folder holds `config.json` (the network's hyper-parameters) and `pytorch_model.bin` (a legacy, non-zip
`torch.save` of the network's state_dict: an OrderedDict with `_metadata`). The network below is a
clean-room re-implementation whose state_dict names and shapes equal the original's, so the file loads
strictly, and `BigGANGenerator.save` writes a folder that the original `BigGAN.from_pretrained` reads.

Format facts the numerics depend on (docs/metrics_biggan_data.md §3.1, tests/data/README.md):
- Spectral norm is used in its eval form: W = weight_orig / sigma with sigma = u · (W_mat v), where u, v
  are the STORED `weight_u` / `weight_v` and W_mat = weight_orig reshaped to [out, -1]. No power iteration,
  ever (also not in training mode), so refining changes sigma only through weight_orig.
- Batch norms carry precomputed statistics for n_stats truncations in [0, 1] (`running_means`,
  `running_vars` [n_stats, C]) and never use batch statistics. Conditional ones scale by
  1 + scale(cond) and shift by offset(cond) (bias-free SN-linear layers of cond = [z, embed]).
- The condition vector is cat(z, embeddings(class_vector)), 2·z_dim wide; `class_embed_dim` is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.values import is_number
from fileformats.arguments import Bound, check_ranges, meta_shapes, shape_mismatch
from fileformats.atomic import atomic_folder, atomic_write
from fileformats.torchfiles import load_weights, save_legacy
from gan_adapters.base import uniform_one_hot

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"
TRUNCNORM_BOUND = 2.0  # truncated_noise_sample draws from N(0, 1) restricted to [-2, 2]


@dataclasses.dataclass
class BigGANConfig:
    """config.json of pytorch-pretrained-biggan. Defaults are the original's (the 128 px model); like the
    original, a file's keys override them and missing keys keep them. `layers[i]` = (upsample?, input
    channel multiplier, output channel multiplier) of channel_width."""

    output_dim: int = 128
    z_dim: int = 128
    class_embed_dim: int = 128  # unused by the network (the embedding is num_classes -> z_dim)
    channel_width: int = 128
    num_classes: int = 1000
    layers: list = dataclasses.field(default_factory=lambda: [
        (False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
        (True, 8, 4), (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1)])
    attention_layer_position: int = 8  # self-attention is inserted before this GenBlock
    eps: float = 1e-4
    n_stats: int = 51

    @classmethod
    def from_dict(cls, d: dict) -> BigGANConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.layers = [(bool(up), int(cin), int(cout)) for up, cin, cout in cfg.layers]
        return cfg

    @property
    def resolution(self) -> int:
        """4x4 after gen_z, doubled by every upsampling block."""
        return 4 * 2 ** sum(up for up, _, _ in self.layers)


# What a config.json can sensibly say (the published 128/256/512 px models: z_dim 128, channel_width 128,
# 1000 classes, up to 14 layers with multipliers up to 16, 51 batch-norm statistics).
CONFIG_BOUNDS = {"z_dim": Bound(1, 4096), "channel_width": Bound(1, 4096), "num_classes": Bound(1, 100_000),
                 "n_stats": Bound(1, 1000), "attention_layer_position": Bound(0, 64),
                 "layers' channel multipliers": Bound(1, 64, items=64)}


# ----------------------------------------------------------------------------------------------------------
# Layers.

class _SpectralNormed(nn.Module):
    """Parameters `bias` (optional), `weight_orig`; buffers `weight_u` [out], `weight_v` [in·k·k] (the
    order and names of torch.nn.utils.spectral_norm's state_dict)."""

    def __init__(self, weight_shape: tuple[int, ...], bias: bool):
        super().__init__()
        if bias:
            self.bias = nn.Parameter(torch.zeros(weight_shape[0]))
        else:
            self.bias = None
        self.weight_orig = nn.Parameter(torch.randn(weight_shape) * 0.02)
        self.register_buffer("weight_u", F.normalize(torch.randn(weight_shape[0]), dim=0))
        self.register_buffer("weight_v", F.normalize(torch.randn(math.prod(weight_shape[1:])), dim=0))

    def sigma(self) -> torch.Tensor:
        """Eval-mode spectral norm estimate u · (W_mat v) with the stored u, v (u, v get no gradient)."""
        w_mat = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        return torch.dot(self.weight_u, torch.mv(w_mat, self.weight_v))

    def weight(self) -> torch.Tensor:
        return self.weight_orig / self.sigma()


class SNLinear(_SpectralNormed):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__((out_features, in_features), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class SNConv2d(_SpectralNormed):
    """Stride 1, 'same' padding (kernel 1 or 3)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), bias)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)


def stat_weights(truncation: float, n_stats: int) -> tuple[int, float, float]:
    """Which stored statistics a truncation uses: (index, weight of stats[index], weight of stats[index+1]).

    The original computes `coef, idx = math.modf(truncation / (1 / (n_stats - 1)))` in Python floats and,
    if coef != 0, mixes `stats[idx] * coef + stats[idx + 1] * (1 - coef)`: the fraction weights the LOWER
    index (swapped against a linear interpolation). E.g. 0.655 with 51 stats -> 0.75·stats[32] +
    0.25·stats[33]. Reproduced exactly, float arithmetic included (same index at every truncation).
    """
    coef, idx = math.modf(truncation / (1.0 / (n_stats - 1)))
    if coef == 0.0:
        return int(idx), 1.0, 0.0
    return int(idx), coef, 1.0 - coef


class TruncationStats(nn.Module):
    """Buffers `running_means`, `running_vars` [n_stats, C] and the statistics for one truncation."""

    def __init__(self, num_features: int, n_stats: int):
        super().__init__()
        self.register_buffer("running_means", torch.zeros(n_stats, num_features))
        self.register_buffer("running_vars", torch.ones(n_stats, num_features))

    def stats(self, truncation: float) -> tuple[torch.Tensor, torch.Tensor]:
        idx, w_lo, w_hi = stat_weights(truncation, self.running_means.shape[0])
        if w_hi == 0.0:
            return self.running_means[idx], self.running_vars[idx]
        return (self.running_means[idx] * w_lo + self.running_means[idx + 1] * w_hi,
                self.running_vars[idx] * w_lo + self.running_vars[idx + 1] * w_hi)


class ConditionalBatchNorm(TruncationStats):
    """out = (x - mean_T) / sqrt(var_T + eps) · (1 + scale(cond)) + offset(cond)."""

    def __init__(self, num_features: int, cond_dim: int, n_stats: int, eps: float):
        super().__init__(num_features, n_stats)
        self.eps = eps
        self.scale = SNLinear(cond_dim, num_features, bias=False)
        self.offset = SNLinear(cond_dim, num_features, bias=False)

    def forward(self, x: torch.Tensor, truncation: float, cond: torch.Tensor) -> torch.Tensor:
        mean, var = (s[None, :, None, None] for s in self.stats(truncation))
        gain = 1 + self.scale(cond)[:, :, None, None]
        return (x - mean) / torch.sqrt(var + self.eps) * gain + self.offset(cond)[:, :, None, None]


class BatchNorm(TruncationStats):
    """Unconditional, with affine `weight`, `bias`: F.batch_norm with the truncation's statistics."""

    def __init__(self, num_features: int, n_stats: int, eps: float):
        super().__init__(num_features, n_stats)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor, truncation: float) -> torch.Tensor:
        mean, var = self.stats(truncation)
        return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps)


class SelfAttention(nn.Module):
    """SAGAN attention: theta, phi (C -> C/8), g (C -> C/2), o_conv (C/2 -> C), bias-free SN 1x1 convs;
    phi and g are 2x2 max-pooled. attn = softmax_j(theta_i · phi_j);
    out = x + gamma · o_conv(Σ_j attn_ij g_j)."""

    def __init__(self, channels: int):
        super().__init__()
        self.snconv1x1_theta = SNConv2d(channels, channels // 8, 1, bias=False)
        self.snconv1x1_phi = SNConv2d(channels, channels // 8, 1, bias=False)
        self.snconv1x1_g = SNConv2d(channels, channels // 2, 1, bias=False)
        self.snconv1x1_o_conv = SNConv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.snconv1x1_theta(x).flatten(2)  # [N, C/8, HW]
        phi = F.max_pool2d(self.snconv1x1_phi(x), 2).flatten(2)  # [N, C/8, HW/4]
        g = F.max_pool2d(self.snconv1x1_g(x), 2).flatten(2)  # [N, C/2, HW/4]
        attn = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # [N, HW, HW/4]
        attn_g = torch.bmm(g, attn.transpose(1, 2)).reshape(n, c // 2, h, w)
        return x + self.gamma * self.snconv1x1_o_conv(attn_g)


class GenBlock(nn.Module):
    """BigGAN-deep residual block: 4 x (conditional BN, ReLU, SN conv) with kernels 1, 3, 3, 1 and a
    bottleneck of in/4 channels; nearest 2x upsampling before the first 3x3 conv. Skip path: the first in/2
    channels when the width changes (the format only halves it), nearest 2x upsampling when upsampling."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, upsample: bool, n_stats: int,
                 eps: float):
        super().__init__()
        mid = in_channels // 4
        self.upsample = upsample
        self.drop_channels = in_channels != out_channels
        for i, (cin, cout, k) in enumerate([(in_channels, mid, 1), (mid, mid, 3), (mid, mid, 3),
                                            (mid, out_channels, 1)]):
            self.add_module(f"bn_{i}", ConditionalBatchNorm(cin, cond_dim, n_stats, eps))
            self.add_module(f"conv_{i}", SNConv2d(cin, cout, k))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, truncation: float) -> torch.Tensor:
        skip = x
        for i in range(4):
            x = F.relu(getattr(self, f"bn_{i}")(x, truncation, cond))
            if i == 1 and self.upsample:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = getattr(self, f"conv_{i}")(x)
        if self.drop_channels:
            skip = skip[:, :skip.shape[1] // 2]
        if self.upsample:
            skip = F.interpolate(skip, scale_factor=2, mode="nearest")
        return x + skip


class BigGANBody(nn.Module):
    """The generator network after the class embedding (the original's `generator` module):
    cond -> gen_z (SN-linear to 4·4·16·ch, laid out NHWC as in TF, permuted to NCHW) -> GenBlocks
    (attention before block `attention_layer_position`) -> BN -> ReLU -> SN 3x3 conv (ch -> ch) -> first 3
    channels -> tanh."""

    def __init__(self, cfg: BigGANConfig):
        super().__init__()
        ch, cond_dim = cfg.channel_width, 2 * cfg.z_dim
        self.gen_z = SNLinear(cond_dim, 4 * 4 * 16 * ch)
        layers: list[nn.Module] = []
        for i, (up, cin, cout) in enumerate(cfg.layers):
            if i == cfg.attention_layer_position:
                layers.append(SelfAttention(ch * cin))
            layers.append(GenBlock(ch * cin, ch * cout, cond_dim, up, cfg.n_stats, cfg.eps))
        self.layers = nn.ModuleList(layers)
        self.bn = BatchNorm(ch, cfg.n_stats, cfg.eps)
        self.conv_to_rgb = SNConv2d(ch, ch, 3)

    def forward(self, cond: torch.Tensor, truncation: float) -> torch.Tensor:
        x = self.gen_z(cond)
        x = x.reshape(x.shape[0], 4, 4, -1).permute(0, 3, 1, 2)
        for layer in self.layers:
            x = layer(x, cond, truncation) if isinstance(layer, GenBlock) else layer(x)
        x = self.conv_to_rgb(F.relu(self.bn(x, truncation)))
        return torch.tanh(x[:, :3])


class BigGAN(nn.Module):
    """`BigGAN(cfg)(z, class_vector, truncation)`: z [N, z_dim] (already scaled by the truncation, see
    `truncated_noise`), class_vector [N, num_classes] (one-hot or soft), 0 < truncation <= 1 (selects the
    batch-norm statistics). Returns images [N, 3, R, R] in [-1, 1]."""

    def __init__(self, cfg: BigGANConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Linear(cfg.num_classes, cfg.z_dim, bias=False)
        self.generator = BigGANBody(cfg)

    def forward(self, z: torch.Tensor, class_vector: torch.Tensor, truncation: float) -> torch.Tensor:
        check_truncation(truncation)
        return self.generator(torch.cat([z, self.embeddings(class_vector)], dim=1), truncation)


def check_truncation(truncation: float) -> None:
    if not is_number(truncation) or not 0 < truncation <= 1:
        raise UserError(f"BigGAN truncation must lie in (0, 1], got {truncation}; "
                        "pass e.g. --truncation 1.0 (no truncation beyond the [-2, 2] prior) or 0.5")


def truncated_noise(n: int, z_dim: int, truncation: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """truncation · X with X ~ N(0, 1) restricted to [-2, 2] (pytorch-pretrained-biggan's
    `truncated_noise_sample` semantics), as float32 [n, z_dim].

    Drawn by the inverse CDF, X = Phi^-1(Phi(-2) + U·(Phi(2) - Phi(-2))), U ~ U(0, 1) from `generator` (in
    float64, one uniform per value, so a seed fixes the result). Same distribution as the original's
    scipy `truncnorm.rvs(-2, 2)`, but NOT the same stream: a numpy seed there does not reproduce values here.
    """
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, z_dim, generator=generator, dtype=torch.float64, device=gen_device)
    lo = 0.5 * math.erfc(TRUNCNORM_BOUND / math.sqrt(2))  # Phi(-2); Phi(2) = 1 - lo
    x = torch.special.ndtri(lo + u * (1 - 2 * lo)).clamp(-TRUNCNORM_BOUND, TRUNCNORM_BOUND)
    return (truncation * x).to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# The folder format and the Generator adapter.

def read_folder(folder: Path) -> tuple[bytes, BigGANConfig, OrderedDict]:
    """config.json bytes, the parsed config and the state_dict of a pytorch-pretrained-biggan folder."""
    what = "pytorch-pretrained-biggan folder (config.json + pytorch_model.bin)"
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; a BigGAN-deep model is a {what}")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise UserError(f"{folder} is not a BigGAN-deep folder: {' and '.join(missing)} missing "
                        f"(found: {', '.join(found) or 'nothing'}); expected a {what}")
    config_bytes = (folder / CONFIG_NAME).read_bytes()
    expected = "expected the JSON written by pytorch-pretrained-biggan (z_dim, channel_width, layers, ...)"
    try:
        cfg_dict = json.loads(config_bytes)
    except ValueError as e:
        raise UserError(f"{folder / CONFIG_NAME} is not JSON ({e}); {expected}") from e
    if not isinstance(cfg_dict, dict) or "layers" not in cfg_dict:
        keys = sorted(cfg_dict)[:8] if isinstance(cfg_dict, dict) else type(cfg_dict).__name__
        raise UserError(f"{folder / CONFIG_NAME} is not a BigGAN-deep config (no 'layers'; found {keys}); "
                        f"{expected}")
    try:
        cfg = BigGANConfig.from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise UserError(f"{folder / CONFIG_NAME} has malformed entries ({e}); {expected}") from e
    multipliers = [m for _, cin, cout in cfg.layers for m in (cin, cout)]
    check_ranges(str(folder / CONFIG_NAME), "BigGAN-deep config",
                 {**dataclasses.asdict(cfg), "layers' channel multipliers": multipliers}, CONFIG_BOUNDS)
    for up, cin, cout in cfg.layers:
        if cin != cout and cout * 2 != cin:
            raise UserError(f"{folder / CONFIG_NAME}: layer ({up}, {cin}, {cout}) changes the width by other "
                            "than halving it, which the BigGAN-deep skip connection cannot do")
    state = load_weights(folder / WEIGHTS_NAME, str(folder / WEIGHTS_NAME),
                         "expected a pytorch-pretrained-biggan weight file")
    if not isinstance(state, dict):
        raise UserError(f"{folder / WEIGHTS_NAME} holds a {type(state).__name__}, not a state_dict; "
                        "expected a pytorch-pretrained-biggan weight file")
    return config_bytes, cfg, state


def _load_network(folder: Path, state: dict, cfg: BigGANConfig) -> BigGAN:
    ours = meta_shapes(lambda: BigGAN(cfg))  # checked against the file before anything is allocated
    problems = shape_mismatch(ours, {k: tuple(getattr(v, "shape", ())) for k, v in state.items()})
    if problems:
        raise UserError(f"{folder / WEIGHTS_NAME}: the tensor names and shapes do not match a BigGAN-deep network "
                        f"built from its config.json ({problems}); is this a pytorch-pretrained-biggan folder "
                        "with its own config?")
    net = BigGAN(cfg)
    net.load_state_dict(state, strict=True)
    return net


class BigGANGenerator(nn.Module):
    """A BigGAN-deep folder behind the `Generator` interface (gan_adapters/base.py).

    Latents come from the truncated-normal prior at the adapter's fixed truncation (default 1.0: N(0, 1)
    restricted to [-2, 2]); labels are one-hot over the config's classes (ImageNet index order for the
    published models). `self(z, c)` = `self.network(z, c, self.truncation)`, differentiable in the trainable
    parameters (weight_orig, biases, embeddings, gamma, final BN affine); spectral-norm vectors and
    batch-norm statistics are buffers and stay as loaded.
    """

    def __init__(self, network: BigGAN, config_bytes: bytes, file_state: OrderedDict,
                 truncation: float = 1.0):
        super().__init__()
        check_truncation(truncation)
        self.network = network
        self.truncation = float(truncation)
        self.config_bytes = config_bytes  # written back unchanged
        # Key order, dtypes and `_metadata` of the loaded file, so save() reproduces its layout.
        self._file_dtypes = OrderedDict((k, v.dtype) for k, v in file_state.items())
        self._file_metadata = getattr(file_state, "_metadata", None)
        cfg = network.cfg
        self.z_dim = cfg.z_dim
        self.c_dim = cfg.num_classes
        self.resolution = cfg.resolution
        self.channels = 3
        self.data_shape = (3, cfg.resolution, cfg.resolution)

    @property
    def device(self) -> torch.device:
        return self.network.embeddings.weight.device

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return truncated_noise(n, self.z_dim, self.truncation, generator, self.device)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else self.device
        return uniform_one_hot(n, self.c_dim, generator, gen_device).to(self.device)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is None:
            raise UserError(f"BigGAN-deep is class-conditional ({self.c_dim} classes): it needs labels")
        return self.network(z, c, self.truncation)

    def file_state_dict(self) -> OrderedDict:
        """The network's tensors on CPU in the loaded file's key order and dtypes, with its `_metadata`."""
        ours = self.network.state_dict()
        out = OrderedDict((k, ours[k].detach().to("cpu", dtype).contiguous())
                          for k, dtype in self._file_dtypes.items())
        if self._file_metadata is not None:
            out._metadata = self._file_metadata
        return out

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """Write a pytorch-pretrained-biggan folder: config.json as loaded, pytorch_model.bin in the legacy
        non-zip torch.save format (storages numbered, so the same weights give the same bytes). Both files
        are written into a temporary folder beside `folder` first; a new folder then appears in one rename,
        an existing one gets each file by an atomic rename. Existing model files are only replaced with
        overwrite=True."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"cannot save BigGAN to {folder}: it is a file; name a folder")
        taken = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (folder / n).exists()]
        if taken and not overwrite:
            raise UserError(f"{folder} already holds {' and '.join(taken)}; choose a new output folder "
                            "(input models are never overwritten unless asked)")
        state = self.file_state_dict()
        with atomic_folder(folder) as tmp:
            atomic_write(tmp / WEIGHTS_NAME, lambda f: save_legacy(state, f))
            atomic_write(tmp / CONFIG_NAME, lambda f: f.write(self.config_bytes))


def load_biggan(folder: str | os.PathLike, device: torch.device | str | None = None,
                truncation: float = 1.0) -> BigGANGenerator:
    """Load a pytorch-pretrained-biggan folder (config.json + pytorch_model.bin) as a `BigGANGenerator`.

    The weight file is read with torch.load(weights_only=True) (the legacy non-zip format of the published
    files is supported by it) and loaded strictly. Anything else raises UserError saying what was found.
    """
    folder = Path(folder)
    check_truncation(truncation)
    config_bytes, cfg, state = read_folder(folder)
    net = _load_network(folder, state, cfg)
    return BigGANGenerator(net, config_bytes, state, truncation).to(device or "cpu")


def is_biggan_folder(path: str | os.PathLike) -> bool:
    """Cheap format sniff for the loader's dispatch: a folder with config.json and pytorch_model.bin."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
