"""Preconditioners of EDM (Karras et al. 2022, Table 1): the denoiser is

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F((c_in(σ)·x), c_noise(σ))                      (eq. 7)

around a raw U-Net F. Written from a description of NVlabs/edm training/networks.py; constructor
arguments, attributes and module names equal the original's (`model` is the U-Net; iDDPM adds the
buffer `u`), so a pickle's `_init_kwargs` rebuild the network and its state dict loads 1:1.

Precision: like the original, the U-Net runs in fp16 only when `use_fp16` is set, x is on CUDA and
`force_fp32` is not given; a `dtype` argument to forward (e.g. torch.bfloat16) overrides the reduced
precision type on CUDA. Everything outside the U-Net is float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from teachers.edm_unets import UNETS

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    """EDM's preconditioning (Karras et al. 2022, Table 1, column "Ours (EDM)"), for σ of any shape:

        c_skip(σ) = σ_d² / (σ² + σ_d²)        c_out(σ) = σ·σ_d / √(σ² + σ_d²)
        c_in(σ)   = 1 / √(σ² + σ_d²)          c_noise(σ) = ¼·ln(σ)

    so that D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) (eq. 7) has unit-variance network inputs and
    training targets (NVlabs/edm training/networks.py EDMPrecond). Returns (c_skip, c_out, c_in, c_noise)."""
    sd2 = sigma_data**2
    return (sd2 / (sigma**2 + sd2), sigma * sigma_data / (sigma**2 + sd2).sqrt(),
            1 / (sd2 + sigma**2).sqrt(), sigma.log() / 4)


def precond_inputs(x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None, label_dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A preconditioner's inputs as EDM's and EDM2's `forward` take them: x in float32, σ as [N, 1, 1, 1]
    (per sample or one value), labels float32 [N, label_dim] (all-zero when a conditional network gets
    none; None for an unconditional one)."""
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    if label_dim == 0:
        return x, sigma, None
    if class_labels is None:
        return x, sigma, torch.zeros([1, label_dim], device=x.device)
    return x, sigma, class_labels.to(torch.float32).reshape(-1, label_dim)


class Precond(nn.Module):
    """Common forward of the four preconditioners; subclasses give `coefficients(σ)`."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool,
                 model_type: str, model_out_channels: int, model_kwargs: dict):
        if model_type not in UNETS:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(UNETS)}")
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=model_out_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        """(c_skip, c_out, c_in, c_noise) for σ of shape [N, 1, 1, 1] (float32)."""
        raise NotImplementedError

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The nearest noise level the network supports (identity except for iDDPM)."""
        return torch.as_tensor(sigma)

    def model_dtype(self, x: torch.Tensor, force_fp32: bool, dtype: torch.dtype | None) -> torch.dtype:
        """Reduced precision only on CUDA and unless forced to fp32: `dtype` if given, else fp16 iff
        use_fp16."""
        reduced = dtype if dtype is not None else (torch.float16 if self.use_fp16 else torch.float32)
        return reduced if x.device.type == "cuda" and not force_fp32 else torch.float32

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, dtype: torch.dtype | None = None, **model_kwargs) -> torch.Tensor:
        """D(x; σ) in float32. σ is per sample ([N]) or one value; missing class labels of a conditional
        network mean all-zero labels; model_kwargs (augment_labels) go to the U-Net."""
        x, sigma, class_labels = precond_inputs(x, sigma, class_labels, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        model_dtype = self.model_dtype(x, force_fp32, dtype)
        F_x = self.model((c_in * x).to(model_dtype), c_noise.flatten(), class_labels=class_labels,
                         **model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)


class EDMPrecond(Precond):
    """EDM's preconditioner: the coefficients of `edm_coefficients`."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels,
                         model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(Precond):
    """Variance preserving (Song et al. 2021): σ(t) = √(exp(½β_d t² + β_min t) − 1);
    c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1), c_noise = (M−1)·σ⁻¹(σ)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels,
                         model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Evaluated in float32 like the original (σ(1e-5) comes out as 2^-10 there); on the CPU also
        # when the network is built on the meta device (fileformats.arguments.check_size).
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, device="cpu")))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """t = (√(β_min² + 2β_d ln(1+σ²)) − β_min) / β_d."""
        root = (self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt()
        return (root - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise


class VEPrecond(Precond):
    """Variance exploding (Song et al. 2021): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels,
                         model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


def iddpm_sigmas(M: int, C_1: float, C_2: float) -> torch.Tensor:
    """Noise levels u_0 > … > u_M = 0 of improved DDPM (Nichol & Dhariwal 2021, EDM Table 1):
    u_{j−1} = √((u_j² + 1) / max(ᾱ(j−1)/ᾱ(j), C_1) − 1), ᾱ(j) = sin²(½π j / (M (C_2 + 1)))."""
    def alpha_bar(j: int) -> float:
        return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2

    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return torch.tensor(u, dtype=torch.float32, device="cpu")


class iDDPMPrecond(Precond):
    """Improved DDPM: c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1), c_noise = M − 1 − argmin_j |σ − u_j|.
    The U-Net has 2·img_channels outputs (learned variance); only the first img_channels are used."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2,
                         model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = iddpm_sigmas(M, C_1, C_2)
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def sigma_index(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Index j of the nearest u_j, same shape as σ."""
        sigma = torch.as_tensor(sigma)
        dist = (sigma.to(self.u.device, torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        return dist.argmin(1).reshape(sigma.shape).to(sigma.device)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return self.u[self.sigma_index(sigma).to(self.u.device)].to(sigma.device, sigma.dtype)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_noise = self.M - 1 - self.sigma_index(sigma).to(torch.float32)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise


class TimestepEmbedding(nn.Module):
    """Guided diffusion's timestep embedding [cos(t·ω_j), sin(t·ω_j)], ω_j = exp(−ln(max_period)·j/(C/2)),
    j < C/2 (openai/guided-diffusion and openai/consistency_models `timestep_embedding`). Mathematically
    EDM's PositionalEmbedding without endpoint; evaluated the same way as the original so that large t
    (250·ln 80 ≈ 1095) gives the same phases in float32."""

    def __init__(self, num_channels: int, max_period: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                          / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1).to(t.dtype)


class ConsistencyPrecond(EDMPrecond):
    """Consistency models (Song et al. 2023, eq. 7 / appendix C; openai/consistency_models
    `get_scalings_for_boundary_condition` and `denoise`), f(x, σ) = c_skip·x + c_out·F(c_in·x; c_noise):
    c_skip = σd²/((σ−σ_min)² + σd²), c_out = (σ−σ_min)·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²),
    c_noise = 1000·¼·ln(σ + 1e-44), so f(x, σ_min) = x. F is guided diffusion's UNetModel, which is
    EDM's DhariwalUNet with guided diffusion's timestep embedding (gan_adapters/published.py maps the
    parameter names)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.002, sigma_max: float = 80, sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data,
                         model_type, **model_kwargs)
        self.model.map_noise = TimestepEmbedding(self.model.map_layer0.in_features)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd2, s = self.sigma_data**2, sigma - self.sigma_min
        return (sd2 / (s**2 + sd2), s * self.sigma_data / (sigma**2 + sd2).sqrt(), 1 / (sigma**2 + sd2).sqrt(),
                250 * (sigma + 1e-44).log())


PRECONDS: dict[str, type[Precond]] = {cls.__name__: cls for cls in (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond,
                                                                     ConsistencyPrecond)}
