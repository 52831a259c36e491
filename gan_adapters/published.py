"""Published one-step generators stored as bare torch state dicts, loaded as `OneStepGenerator`s.

    G(z, c) = f(σ_init·z; σ_init, c),  z ~ N(0, I) of the image's shape, σ_init = 80,

- DMD2 (Yin et al. 2024, tianweiy/DMD2 `main/edm`): `pytorch_model.bin` = the state dict of EDM's
  `EDMPrecond(DhariwalUNet)` (no augmentation mapping), f = the EDM denoiser, fed 80·z at σ = 80
  (`conditioning_sigma`) with one-hot labels.
- Consistency models (Song et al. 2023, openai/consistency_models): a `.pt` state dict of guided
  diffusion's `UNetModel`, f = the consistency function with the boundary-condition scalings
  (teachers.edm_precond.ConsistencyPrecond, σ_min 0.002, σ_data 0.5), one step from σ_max = 80.
  UNetModel is EDM's DhariwalUNet under other names (`cm_to_edm_names`), so one network serves both.

A state dict holds no configuration: the architecture is read off the tensor shapes (`infer_*`).
What shapes cannot tell is an option: `resolution` for a consistency-model UNet whose channel_mult is
not one of guided diffusion's defaults; `sigma_init` overrides 80. Files are read with
`torch.load(weights_only=True, map_location='cpu')`, so tensors saved on a GPU load on any machine and
nothing in the file is executed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from common.errors import UserError
from common.values import is_integer
from fileformats.arguments import shape_mismatch
from fileformats.torchfiles import load_weights
from gan_adapters.base import refused_options
from gan_adapters.onestep import METADATA_KEY, OneStepGenerator, onestep_from_snapshot
from teachers import edm2
from teachers.edm_layers import skip_init
from teachers.edm_loader import network_record
from teachers.edm_precond import ConsistencyPrecond, EDMPrecond, Precond

SIGMA_INIT = 80.0
# guided diffusion's default channel_mult per image size (create_model in script_util.py)
GUIDED_DIFFUSION_SIZES = {(1, 2, 2, 2): 32, (1, 2, 3, 4): 64, (1, 1, 2, 3, 4): 128, (1, 1, 2, 2, 4, 4): 256}
HEAD_CHANNELS = 64  # DhariwalUNet's channels per attention head; every published ADM / CM model uses 64

Tensors = Mapping[str, torch.Tensor]


def read_state_dict(path: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint on the CPU; a leading 'module.' (DDP / accelerate) is dropped."""
    obj = load_weights(path, name, "give the generator's pytorch_model.bin / .pt state dict")
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{name}: a torch checkpoint, but not a state dict (a flat mapping of names to "
                        "tensors); give the generator's weights file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _shape(tensors: Tensors, key: str, name: str) -> torch.Size:
    if key not in tensors:
        raise UserError(f"{name}: the state dict has no {key!r}; it is not a complete network of this layout")
    return tensors[key].shape


def _resolutions(keys: Any, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found, reverse=True)


def infer_edm_dhariwal(tensors: Tensors, name: str) -> dict[str, Any]:
    """EDMPrecond(DhariwalUNet) constructor arguments from state-dict shapes (EDM's module names)."""
    keys = list(tensors)
    res = _resolutions(keys, r"model\.enc\.(\d+)x\d+_")
    if not res:
        raise UserError(f"{name}: no 'model.enc.*' tensors; not an EDMPrecond state dict")
    r0 = res[0]
    conv = _shape(tensors, f"model.enc.{r0}x{r0}_conv.weight", name)
    mc = _shape(tensors, "model.map_layer0.weight", name)[1]
    emb = _shape(tensors, "model.map_layer0.weight", name)[0]
    mult = []
    for r in res:
        key = f"model.enc.{r}x{r}_block0.conv0.weight"
        mult.append(_shape(tensors, key, name)[0] // mc)
    blocks = {m.group(1) for k in keys if (m := re.match(rf"model\.enc\.{r0}x{r0}_block(\d+)\.", k))}
    attn = sorted({r for r in res if any(re.match(rf"model\.(enc|dec)\.{r}x{r}_block\d+\.qkv\.", k) for k in keys)},
                  reverse=True)
    return dict(img_resolution=r0, img_channels=conv[1],
                label_dim=tensors["model.map_label.weight"].shape[1] if "model.map_label.weight" in tensors else 0,
                use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet",
                augment_dim=tensors["model.map_augment.weight"].shape[1] if "model.map_augment.weight" in tensors
                else 0, model_channels=mc, channel_mult=mult, channel_mult_emb=emb // mc, num_blocks=len(blocks),
                attn_resolutions=attn, dropout=0.0, label_dropout=0)


def infer_consistency_unet(tensors: Tensors, name: str, resolution: int | None) -> dict[str, Any]:
    """ConsistencyPrecond(DhariwalUNet) arguments from a guided-diffusion UNetModel state dict."""
    keys = list(tensors)
    mc = _shape(tensors, "time_embed.0.weight", name)[1]
    emb = _shape(tensors, "time_embed.0.weight", name)[0]
    in_ch = _shape(tensors, "input_blocks.0.0.weight", name)[1]
    out_ch = _shape(tensors, "out.2.weight", name)[0]
    n_in = len({k.split(".")[1] for k in keys if k.startswith("input_blocks.")})
    n_out = len({k.split(".")[1] for k in keys if k.startswith("output_blocks.")})
    # an output block that ends in an upsampling ResBlock closes a level: every (num_res_blocks + 1)th
    ups = sorted({int(m.group(1)) for k in keys if (m := re.match(r"output_blocks\.(\d+)\.[12]\.in_layers\.", k))})
    per_level = ups[0] + 1 if ups else n_out
    levels = n_out // per_level
    problems = []
    if out_ch != in_ch:
        problems.append(f"{out_ch} output channels for {in_ch} input channels (learned variance)")
    if any(re.match(r"input_blocks\.\d+\.0\.op\.", k) for k in keys):
        problems.append("convolutional down/upsampling (resblock_updown=False)")
    if n_in != levels * per_level or n_out % per_level:
        problems.append(f"{n_in} input and {n_out} output blocks, which no channel_mult/num_res_blocks gives")
    if problems:
        raise UserError(f"{name}: this guided-diffusion UNet is not supported: {'; '.join(problems)}. "
                        "Supported: the consistency-model layout (resblock_updown=True, 3 output channels)")
    mult = tuple(_shape(tensors, f"input_blocks.{1 + level * per_level}.0.out_layers.3.weight", name)[0] // mc
                 for level in range(levels))
    attn_levels = sorted({(int(m.group(1)) - 1) // per_level for k in keys
                          if (m := re.match(r"input_blocks\.(\d+)\.1\.qkv\.", k))})
    if resolution is None:
        resolution = GUIDED_DIFFUSION_SIZES.get(mult)
        if resolution is None:
            raise UserError(f"{name}: a consistency-model UNet with channel_mult {list(mult)}, which is not a "
                            "guided-diffusion default, so its image size cannot be read from the weights: give "
                            "the size it was trained at with --resolution N (Python API: "
                            "gan_adapters.loader.load_generator(path, resolution=N))")
    if not is_integer(resolution):
        raise UserError(f"{name}: resolution must be a whole number (the image size), not {resolution!r}")
    if resolution < 1 or resolution % (1 << (levels - 1)):
        raise UserError(f"{name}: resolution {resolution} does not fit a UNet of {levels} levels, which halves the "
                        f"image {levels - 1} times: give a multiple of {1 << (levels - 1)}")
    widths = [mc * m for m in mult]
    if any(widths[level] % HEAD_CHANNELS for level in attn_levels):
        raise UserError(f"{name}: attention widths {widths} are not multiples of {HEAD_CHANNELS} channels per "
                        "head (num_head_channels=64), the only layout refiner supports")
    label = tensors.get("label_emb.weight")
    return dict(img_resolution=resolution, img_channels=in_ch, label_dim=label.shape[0] if label is not None else 0,
                use_fp16=False, model_type="DhariwalUNet", model_channels=mc, channel_mult=list(mult),
                channel_mult_emb=emb // mc, num_blocks=per_level - 1,
                attn_resolutions=[resolution >> level for level in attn_levels], dropout=0.0,
                adaptive_scale=_shape(tensors, "input_blocks.1.0.emb_layers.1.weight", name)[0] == 2 * widths[0])


def cm_to_edm_names(network: ConsistencyPrecond, tensors: Tensors, name: str = "the file") -> dict[str, torch.Tensor]:
    """Guided diffusion's UNetModel tensors under EDM DhariwalUNet names, in our network's layout.

    Both run the same blocks in the same order: input_blocks[i] = enc[i] (ResBlock at .0, attention at
    .1), middle_block = dec in0 (ResBlock + attention) and in1, output_blocks[k] = the k-th decoder block,
    whose last sub-module is the next level's upsampling block. ResBlock in_layers.0/.2 = norm0/conv0,
    emb_layers.1 = affine, out_layers.0/.3 = norm1/conv1, skip_connection = skip; attention norm = norm2,
    proj_out = proj, qkv rows (q|k|v, head, channel) reordered to EDM's (head, channel, q|k|v);
    label_emb = map_label transposed. Resampling filters (constants) keep our values; every parameter
    of ours must get a tensor and every tensor of theirs must be used."""
    unet = network.model
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def copy(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in tensors:
                mapped[f"model.{dst}.{suffix}"] = tensors[f"{src}.{suffix}"]
                used.add(f"{src}.{suffix}")

    def block(src: str, dst: str, attention: str | None) -> None:
        for a, b in (("in_layers.0", "norm0"), ("in_layers.2", "conv0"), ("emb_layers.1", "affine"),
                     ("out_layers.0", "norm1"), ("out_layers.3", "conv1"), ("skip_connection", "skip")):
            copy(f"{src}.{a}", f"{dst}.{b}")
        if attention is not None:
            copy(f"{attention}.norm", f"{dst}.norm2")
            copy(f"{attention}.proj_out", f"{dst}.proj")
            heads = unet.get_submodule(dst).num_heads
            for suffix in ("weight", "bias"):
                w = tensors.get(f"{attention}.qkv.{suffix}")
                if w is None:
                    continue  # reported below as a parameter without a source
                used.add(f"{attention}.qkv.{suffix}")
                w = w.reshape(3, heads, w.shape[0] // (3 * heads), -1).permute(1, 2, 0, 3).reshape(w.shape)
                mapped[f"model.{dst}.qkv.{suffix}"] = w

    copy("time_embed.0", "map_layer0")
    copy("time_embed.2", "map_layer1")
    if "label_emb.weight" in tensors:
        mapped["model.map_label.weight"] = tensors["label_emb.weight"].t()
        used.add("label_emb.weight")
    copy("out.0", "out_norm")
    copy("out.2", "out_conv")
    for i, (name, module) in enumerate(unet.enc.items()):
        if name.endswith("_conv"):
            copy(f"input_blocks.{i}.0", f"enc.{name}")
        else:
            block(f"input_blocks.{i}.0", f"enc.{name}", f"input_blocks.{i}.1" if module.num_heads else None)
    k, last = -1, 0
    for name, module in unet.dec.items():
        if name.endswith("_in0"):
            block("middle_block.0", f"dec.{name}", "middle_block.1")
        elif name.endswith("_in1"):
            block("middle_block.2", f"dec.{name}", None)
        elif name.endswith("_up"):
            block(f"output_blocks.{k}.{last + 1}", f"dec.{name}", None)
        else:
            k += 1
            last = 1 if module.num_heads else 0
            block(f"output_blocks.{k}.0", f"dec.{name}", f"output_blocks.{k}.1" if last else None)
    unfilled = [k for k, _ in network.named_parameters() if k not in mapped]
    unused = sorted(set(tensors) - used)
    if unfilled or unused:
        raise UserError(f"{name}: the UNetModel tensors do not map onto DhariwalUNet (ours without a source: "
                        f"{unfilled[:3]}, theirs unused: {unused[:3]}); the file is from a modified code base")
    return {key: mapped[key].reshape(t.shape) if key in mapped else t for key, t in network.state_dict().items()}


def _load_into(network: Precond, tensors: Tensors, name: str, what: str) -> Precond:
    """Strict, shape-checked load; a mismatch means the inferred architecture is wrong."""
    problems = shape_mismatch({k: tuple(v.shape) for k, v in network.state_dict().items()},
                              {k: tuple(v.shape) for k, v in tensors.items()})
    if problems:
        raise UserError(f"{name}: the weights do not fit {what} built from their shapes ({problems}); the file "
                        "is from a modified code base")
    network.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return network


def load_dmd2(tensors: Tensors, name: str) -> tuple[Precond, dict]:
    kwargs = infer_edm_dhariwal(tensors, name)
    with skip_init():
        network = EDMPrecond(**kwargs)
    return _load_into(network, tensors, name, "EDMPrecond(DhariwalUNet)"), kwargs


def load_consistency(tensors: Tensors, name: str, resolution: int | None) -> tuple[Precond, dict]:
    kwargs = infer_consistency_unet(tensors, name, resolution)
    if not kwargs.pop("adaptive_scale"):  # use_scale_shift_norm=False: the embedding is added (LSUN models)
        raise UserError(f"{name}: a consistency-model UNet without scale-shift norm (use_scale_shift_norm="
                        "False, the LSUN models); only the ImageNet-64 layout (scale-shift) is supported")
    with skip_init():
        network = ConsistencyPrecond(**kwargs)
    return _load_into(network, cm_to_edm_names(network, tensors, name), name, "guided diffusion's UNetModel"), kwargs


def load_published(path: str, name: str, device: torch.device | str | None = None,
                   sigma_init: float | None = None, resolution: int | None = None,
                   **unknown: Any) -> OneStepGenerator:
    """A DMD2 or consistency-model generator from its state-dict file (module docstring)."""
    if unknown:
        raise refused_options(name, "a one-step generator state dict", unknown)
    tensors = read_state_dict(path, name)
    if "model.map_layer0.weight" in tensors and "model.out_conv.weight" in tensors:
        if resolution is not None:
            raise UserError(f"{name}: a DMD2 / EDMPrecond(DhariwalUNet) state dict names its resolution "
                            "itself; leave resolution out")
        network, kwargs = load_dmd2(tensors, name)
    elif "time_embed.0.weight" in tensors and "input_blocks.0.0.weight" in tensors:
        network, kwargs = load_consistency(tensors, name, resolution)
    else:
        first = ", ".join(list(tensors)[:3])
        raise UserError(f"{name}: a state dict of no known one-step generator (its first tensors: {first}); "
                        "refiner reads DMD2's EDMPrecond(DhariwalUNet) pytorch_model.bin and consistency "
                        "models' guided-diffusion UNetModel .pt files")
    template = network_record(network, kwargs)
    generator = OneStepGenerator(network, template, SIGMA_INIT if sigma_init is None else sigma_init, name)
    return generator.eval().to(device) if device is not None else generator.eval()


def is_edm2_without_metadata(data: Any) -> bool:
    return isinstance(data, dict) and edm2.is_edm2(data.get("ema")) and METADATA_KEY not in data


def edm2_generator(data: Any, name: str, device: torch.device | str | None, opts: dict) -> OneStepGenerator:
    """An EDM2 pickle without refiner's metadata given where a generator is expected: with sigma_init it is
    read as a one-step generator of EDM2's layout (pixel space only); without, say what it is and where
    it goes."""
    edm2.pixel_encoder(data, name)
    if opts.get("sigma_init") is None:
        raise UserError(f"{name} is an EDM2 diffusion model (a teacher, not a generator): give it as --teacher "
                        "to refiner refine, distill or sample. If it is a one-step generator of EDM2's layout, "
                        "give its σ_init")
    return onestep_from_snapshot(data, name, device, **opts)
