"""The U-Nets of EDM (Karras et al. 2022): SongUNet (DDPM++ / NCSN++ of Song et al. 2021) and
DhariwalUNet (ADM of Dhariwal & Nichol 2021). Written from a description of NVlabs/edm
training/networks.py; constructor arguments and module names equal the original's, so a pickle's
`_init_kwargs` build the network and its state dict loads 1:1.

Encoder and decoder are `nn.ModuleDict`s keyed `'{r}x{r}_{part}'`, built for both U-Nets by `build_encoder`
and `build_decoder` and run by `encode` and `decode`; entries whose name contains `aux` belong to the
NCSN++ input/output pyramids (encoder 'skip'/'residual', decoder 'skip').
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teachers.edm_layers import (
    BlockConfig,
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Init,
    Linear,
    PositionalEmbedding,
    UNetBlock,
)


def drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Classifier-free-guidance label dropout: zero each sample's labels with probability p (training)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def encode(enc: nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the encoder; every non-aux output is a skip connection.

    aux pyramid (NCSN++): `aux_down` downsamples the image pyramid, `aux_skip` adds its projection to x
    ('skip' encoder), `aux_residual` sets x = aux = (x + conv(aux)) / √2 ('residual' encoder)."""
    skips: list[torch.Tensor] = []
    aux = x
    for name, block in enc.items():
        if name.endswith("aux_down"):
            aux = block(aux)
        elif name.endswith("aux_skip"):
            x = skips[-1] = x + block(aux)
        elif name.endswith("aux_residual"):
            x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
        else:
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
    return x, skips


def decode(dec: nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the decoder, concatenating the newest skip whenever a block expects more channels than x has.

    Output pyramid (DDPM++/NCSN++): `aux_norm` + `aux_conv` turn x into an image that is summed into
    `aux`; `aux_up` upsamples `aux` ('skip' decoder). Returns (x, aux); aux is None for ADM."""
    aux = None
    tmp = None
    for name, block in dec.items():
        if name.endswith("aux_up"):
            aux = block(aux)
        elif name.endswith("aux_norm"):
            tmp = block(x)
        elif name.endswith("aux_conv"):
            tmp = block(F.silu(tmp))
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
    return x, aux


def build_encoder(in_channels: int, stem_channels: int, img_resolution: int, model_channels: int,
                  channel_mult: Sequence[int], num_blocks: int, attn_resolutions: Sequence[int], cfg: BlockConfig,
                  stem_init: Init, inputs: Callable[[int, int], dict[str, nn.Module]] = lambda r, cout: {},
                  ) -> tuple[nn.ModuleDict, int]:
    """The encoder of both EDM U-Nets (NVlabs/edm training/networks.py SongUNet and DhariwalUNet), for `encode`.

    At the highest resolution a 3x3 `conv` to `stem_channels`, at every lower one a `down` block followed
    by the modules of `inputs(r, cout)` as '{r}x{r}_{name}' (SongUNet's input pyramid); then num_blocks
    blocks `block{idx}` to model_channels·mult, attending at `attn_resolutions`. Module names and order
    are the original's, so its state dicts load. Returns (encoder, its output channels)."""
    enc = nn.ModuleDict()
    cout = in_channels
    for level, mult in enumerate(channel_mult):
        r = img_resolution >> level
        if level == 0:
            enc[f"{r}x{r}_conv"] = Conv2d(cout, stem_channels, kernel=3, init=stem_init)
            cout = stem_channels
        else:
            enc[f"{r}x{r}_down"] = UNetBlock(cout, cout, cfg, down=True)
            for name, module in inputs(r, cout).items():
                enc[f"{r}x{r}_{name}"] = module
        for idx in range(num_blocks):
            enc[f"{r}x{r}_block{idx}"] = UNetBlock(cout, model_channels * mult, cfg, attention=r in attn_resolutions)
            cout = model_channels * mult
    return enc, cout


def build_decoder(cout: int, skips: Sequence[int], img_resolution: int, model_channels: int,
                  channel_mult: Sequence[int], num_blocks: int, cfg: BlockConfig,
                  attention: Callable[[int, int], bool],
                  outputs: Callable[[int, int, int], dict[str, nn.Module]] = lambda level, r, cout: {},
                  ) -> tuple[nn.ModuleDict, int]:
    """The decoder of both EDM U-Nets (NVlabs/edm training/networks.py SongUNet and DhariwalUNet), for `decode`.

    From the lowest resolution up: `in0` (with attention) and `in1` at the lowest, `up` at every other,
    then num_blocks + 1 blocks `block{idx}`, each taking the newest encoder output as a skip connection
    (`skips`: the encoder outputs' channels, in encoder order; `cout`: the channels entering the
    decoder). `attention(r, idx)`: whether block idx at resolution r attends; `outputs(level, r, cout)`:
    modules appended after each resolution's blocks as '{r}x{r}_{name}' (SongUNet's output pyramid).
    Module names and order are the original's, so its state dicts load. Returns (decoder, its output
    channels)."""
    skips = list(skips)
    dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{r}x{r}_in0"] = UNetBlock(cout, cout, cfg, attention=True)
            dec[f"{r}x{r}_in1"] = UNetBlock(cout, cout, cfg)
        else:
            dec[f"{r}x{r}_up"] = UNetBlock(cout, cout, cfg, up=True)
        for idx in range(num_blocks + 1):
            dec[f"{r}x{r}_block{idx}"] = UNetBlock(cout + skips.pop(), model_channels * mult, cfg,
                                                   attention=attention(r, idx))
            cout = model_channels * mult
        for name, module in outputs(level, r, cout).items():
            dec[f"{r}x{r}_{name}"] = module
    return dec, cout


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder, filter [1,1]) and NCSN++ (Fourier embedding,
    channel_mult_noise 2, residual encoder, filter [1,3,3,1]) of Song et al. 2021, as in EDM."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        for arg, value, choices in (("embedding_type", embedding_type, ("fourier", "positional")),
                                    ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                    ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in choices:
                raise ValueError(f"SongUNet {arg} must be one of {choices}, got {value!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)
        cfg = BlockConfig(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                          eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                          init=init, init_zero=init_zero,
                          init_attn=Init("xavier_uniform", weight=math.sqrt(0.2)))

        # Mapping: noise label (+ class and augmentation labels) -> embedding vector.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, init=init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, init=init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)

        # Encoder: after every downsampling, the image pyramid's input ('skip': downsampled image projected
        # and added; 'residual': a strided conv of the previous level's features, which it replaces).
        caux = in_channels

        def image_input(r: int, channels: int) -> dict[str, nn.Module]:
            nonlocal caux
            if encoder_type == "skip":
                return {"aux_down": Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter),
                        "aux_skip": Conv2d(caux, channels, kernel=1, init=init)}
            if encoder_type == "residual":
                parts = {"aux_residual": Conv2d(caux, channels, kernel=3, down=True, resample_filter=resample_filter,
                                                fused_resample=True, init=init)}
                caux = channels
                return parts
            return {}

        self.enc, cout = build_encoder(in_channels, model_channels, img_resolution, model_channels, channel_mult,
                                       num_blocks, attn_resolutions, cfg, init, inputs=image_input)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder: attention in the last block of a resolution; an image output after the blocks of
        # every resolution ('skip' decoder, summed up the pyramid) or of the highest.
        def image_output(level: int, r: int, channels: int) -> dict[str, nn.Module]:
            if not (decoder_type == "skip" or level == 0):
                return {}
            parts: dict[str, nn.Module] = {}
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                parts["aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                         resample_filter=resample_filter)
            parts["aux_norm"] = GroupNorm(channels, eps=1e-6)
            parts["aux_conv"] = Conv2d(channels, out_channels, kernel=3, init=init_zero)
            return parts

        self.dec, cout = build_decoder(cout, skips, img_resolution, model_channels, channel_mult, num_blocks, cfg,
                                       attention=lambda r, idx: idx == num_blocks and r in attn_resolutions,
                                       outputs=image_output)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        x, skips = encode(self.enc, x, emb)
        return decode(self.dec, x, emb, skips)[1]


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as in EDM: adaptive scale/shift from the embedding, 64 channels
    per attention head, resampling-only skips on up/down blocks, GroupNorm + conv output head."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
        cfg = BlockConfig(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                          init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, init=init_zero) if augment_dim
                            else None)
        self.map_layer0 = Linear(model_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)
        label_init = Init("kaiming_normal", weight=math.sqrt(label_dim))
        self.map_label = Linear(label_dim, emb_channels, bias=False, init=label_init) if label_dim else None

        self.enc, cout = build_encoder(in_channels, model_channels * channel_mult[0], img_resolution, model_channels,
                                       channel_mult, num_blocks, attn_resolutions, cfg, init)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder: attention in every block at the attention resolutions.
        self.dec, cout = build_decoder(cout, skips, img_resolution, model_channels, channel_mult, num_blocks, cfg,
                                       attention=lambda r, idx: r in attn_resolutions)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, init=init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)
        x, skips = encode(self.enc, x, emb)
        x = decode(self.dec, x, emb, skips)[0]
        return self.out_conv(F.silu(self.out_norm(x)))


UNETS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
