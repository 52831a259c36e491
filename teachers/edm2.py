"""EDM2 teachers (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models"): the magnitude-preserving U-Net and its preconditioner, written from a description of
NVlabs/edm2 training/networks_edm2.py. Class names, constructor arguments, attributes and parameter /
buffer names equal the original's (`Precond` holds `unet`, `logvar_fourier`, `logvar_linear`), so the
`ema` record of an EDM2 pickle rebuilds the network from its `_init_kwargs` and its state dict loads 1:1.

The denoiser is EDM's (Karras et al. 2022, eq. 7 with Table 1's EDM column):

    D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise),  c_skip = σd²/(σ²+σd²), c_out = σσd/√(σ²+σd²),
    c_in = 1/√(σ²+σd²), c_noise = ln(σ)/4,

σ as given (no rounding), σ_data 0.5, class labels one-hot scaled by √label_dim inside the U-Net; EDM2
has no label dropout (guidance uses a separate unconditional network). `return_logvar` also gives the
learned uncertainty u(σ) of the EDM2 loss (eq. 21), a function of σ only.

Pickles (edm2 training_loop.py): an EasyDict {encoder, dataset_kwargs, loss_fn, ema} with `ema` cast to
float16. The `encoder` says in which space the network works: `StandardRGBEncoder` = pixels in [-1, 1]
(the ImageNet-64 models `edm2-img64-*`), `StabilityVAEEncoder` = 4-channel latents of the Stable
Diffusion VAE (the 512 px models). `pixel_encoder` maps the record to our `Encoder` interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from fileformats import nvpickle
from teachers import edm_layers
from teachers.edm_precond import precond_inputs


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ‖x‖·√(n_norm/n_x)): unit RMS magnitude over `dim` (default: all but the first), eq. 66."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down- ('down') or upsampling ('up') with the separable normalised filter f ⊗ f; 'keep' = x."""
    if mode == "keep":
        return x
    taps = torch.tensor(f, dtype=torch.float32)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps).to(x.device, x.dtype).expand(x.shape[1], 1, -1, -1)
    pad = (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, kernel, groups=x.shape[1], stride=2, padding=pad)
    if mode != "up":
        raise ValueError(f"resample mode must be keep, up or down, got {mode!r}")
    return F.conv_transpose2d(x, kernel * 4, groups=x.shape[1], stride=2, padding=pad)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, silu(x)/0.596 (eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1−t)·a + t·b) / √((1−t)² + t²)  (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation whose parts are weighted (1−t) : t and whose result keeps unit magnitude (eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features √2·cos(x·f_j + φ_j), f ~ 2π·N(0, bandwidth²), φ ~ 2π·U(0,1)
    (eq. 75); computed in float32."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        draw = (lambda *s: torch.empty(*s)) if edm_layers.skipping_init() else None
        self.register_buffer("freqs", (draw or torch.randn)(num_channels) * (2 * math.pi * bandwidth))
        self.register_buffer("phases", (draw or torch.rand)(num_channels) * (2 * math.pi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (4-D weight, 'same' padding) or linear layer (2-D weight), eq. 47:
    the weight is normalised per output channel and scaled by gain/√fan_in at every call. In training
    mode the stored weight is also overwritten by its normalised value (forced weight normalisation,
    eq. 66), as in EDM2's training."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        shape = (out_channels, in_channels, *kernel)
        self.weight = nn.Parameter(torch.empty(shape) if edm_layers.skipping_init() else torch.randn(shape))

    def forward(self, x: torch.Tensor, gain: torch.Tensor | float = 1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """Encoder ('enc') or decoder ('dec') block of the EDM2 U-Net (paper Fig. 21), optionally resampling
    and with cosine-attention (pixel-normalised q, k, v; heads of `channels_per_head` channels)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale.reshape(*scale.shape, 1, 1).to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            # qkv channels are laid out as [head, channel, (q, k, v)]; each is pixel-normalised.
            n, c, h, w = x.shape
            qkv = normalize(self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w), dim=2)
            q, k, v = qkv.unbind(3)
            weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = self.attn_proj(torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(n, c, h, w))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """The EDM2 U-Net: MP-Fourier noise embedding (+ class embedding, mixed by `label_balance`), encoder
    and decoder `ModuleDict`s keyed '{r}x{r}_{part}' as in EDM, skips joined by `mp_cat`, and an output
    convolution with a learned gain `out_gain` (zero at initialisation)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, **block_kwargs: Any):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the input gets a constant-one channel
        for level, channels in enumerate(cblock):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = MPConv(cout, channels, kernel=[3, 3])
                cout = channels
            else:
                self.enc[f"{r}x{r}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                  **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{r}x{r}_block{idx}"] = Block(cout, channels, cemb, flavor="enc",
                                                        attention=r in attn_resolutions, **block_kwargs)
                cout = channels

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            r = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{r}x{r}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{r}x{r}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{r}x{r}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f"{r}x{r}_block{idx}"] = Block(cout + skips.pop(), channels, cemb, flavor="dec",
                                                        attention=r in attn_resolutions, **block_kwargs)
                cout = channels
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None
                ) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(nn.Module):
    """EDM2's preconditioner (module docstring) with the `Denoiser`-side attributes our teachers use:
    σ range [0, ∞) (EDM2 sets none) and `round_sigma` = identity. Runs the U-Net in fp16 only when
    `use_fp16`, x is on CUDA and not `force_fp32`; `dtype` overrides the reduced precision type."""

    sigma_min = 0.0
    sigma_max = float("inf")

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs: Any):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, return_logvar: bool = False, dtype: torch.dtype | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """D(x; σ) in float32 (and the log-variance [N,1,1,1] with return_logvar). EDM2 networks take no
        augmentation labels."""
        if augment_labels is not None:
            raise ValueError("EDM2 networks are trained without augmentation and take no augment_labels")
        x, sigma, class_labels = precond_inputs(x, sigma, class_labels, self.label_dim)
        reduced = dtype if dtype is not None else (torch.float16 if self.use_fp16 else torch.float32)
        model_dtype = reduced if x.device.type == "cuda" and not force_fp32 else torch.float32
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        F_x = self.unet((c_in * x).to(model_dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x


PRECONDS: dict[str, type[nn.Module]] = {"Precond": Precond}


def is_edm2(record: Any) -> bool:
    """An `ema` record of EDM2's Precond (its `unet` child is EDM2's UNet)."""
    return (isinstance(record, nvpickle.PersistentObject) and record.class_name == "Precond"
            and getattr(record.children().get("unet"), "class_name", None) == "UNet")


class Encoder(Protocol):
    """Where a teacher's data lives (edm2 training/encoders.py): `encode` maps uint8 pixels [N,3,H,W] to
    the network's space, `decode` maps the network's samples back to uint8 pixels. A latent teacher's
    encoder runs a VAE; the data shape the teacher sees is then the latent's."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...


class StandardRGBEncoder:
    """Pixel-space teachers: x = pixels/127.5 − 1; pixels = (x·127.5 + 128).clip(0, 255) as uint8."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


LATENT_MISSING = ("EDM2's latent models need the Stable Diffusion VAE (stabilityai/sd-vae-ft-mse, diffusers' "
                  "AutoencoderKL) to turn latents into pixels; refiner does not include it yet. Use a pixel-"
                  "space EDM2 teacher (edm2-img64-*)")


def pixel_encoder(data: Any, name: str) -> Encoder:
    """The encoder of an EDM2 pickle as our `Encoder`; files without one (EDM) are pixel-space."""
    record = data.get("encoder") if isinstance(data, dict) else None
    if record is None or getattr(record, "class_name", None) == "StandardRGBEncoder":
        return StandardRGBEncoder()
    kind = getattr(record, "class_name", type(record).__name__)
    if kind == "StabilityVAEEncoder":
        vae = record.state.get("vae_name", "stabilityai/sd-vae-ft-mse")
        raise UserError(f"{name} is a latent EDM2 teacher (encoder StabilityVAEEncoder, VAE {vae}): "
                        + LATENT_MISSING)
    raise UserError(f"{name}: unknown encoder {kind}; refiner reads EDM2 pickles with StandardRGBEncoder "
                    "(pixel space) only")
