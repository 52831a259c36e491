"""A StyleGAN2-ADA or StyleGAN3 network pickle behind the `Generator` interface, and writing it back.

`load_stylegan2(source)` reads a snapshot (`network-snapshot-*.pkl`: training_set_kwargs, G, D,
G_ema, augment_pipe) with the safe reader `fileformats.nvpickle`, builds the clean-room generator
from `G_ema`'s constructor arguments and loads its weights. Files of both NVIDIA code bases load:
NVlabs/stylegan2-ada-pytorch and NVlabs/stylegan3's StyleGAN2 config (gan_adapters/stylegan2.py, one
network, the repository's layout of the arguments told apart by `stylegan_kind`) and StyleGAN3-T/R
(gan_adapters/stylegan3.py). The returned `StyleGAN2Generator` keeps the loaded file; `save(path)`
writes it back with the refined weights in place of G_ema's tensors (and G's, unless keep_G). Every
other entry (D, augment_pipe, training_set_kwargs, module sources, attributes, init kwargs, global
names) is written unchanged, so NVIDIA's `legacy.load_network_pkl` and our own loader read the result.

Training-time choices (options of `load_stylegan2` / `load_generator`):
- noise_mode 'random' (default): fresh per-pixel noise on every call, the distribution NVIDIA's
  metric code samples (G_ema(z, c) with its default noise mode), so refinement improves what FID
  measures. 'const' uses the stored noise_const buffers (each z gives one fixed image); 'none'
  drops the noise inputs.
- truncation_psi 1 (default, truncation off) and truncation_cutoff None; other values truncate
  toward w_avg as the original does.
- force_fp32 True (default): every block in float32 (the loop owns mixed precision). False runs the
  blocks the file marks use_fp16 in float16, as NVIDIA's code does.
- trainable, from most to least:
  'all'            every parameter; in training mode the mapping tracks w_avg as StyleGAN2 training does.
  'mapping-frozen' the mapping MLP (and w_avg) frozen; all of the synthesis network trains,
                   including the per-layer affine style layers.
  'synthesis'      the whole z -> style path frozen: the mapping MLP and every affine style layer.
                   Only the image-making weights train (convolution weights and biases, ToRGB,
                   the 4x4 constant input or StyleGAN3's Fourier-feature mixing matrix, noise
                   strengths), so a z keeps its styles.
  Frozen mappings stay in eval mode (no w_avg updates) whatever train() is called with. StyleGAN3's
  input-magnitude buffers (magnitude_ema) and filters stay as read.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch

from common.errors import UserError
from common.values import is_integer, is_number
from fileformats import nvpickle
from fileformats.arguments import Bound, check_ranges, meta_shapes, shape_mismatch
from gan_adapters.base import refused_options, standard_normal, uniform_one_hot
from gan_adapters.stylegan2 import NOISE_MODES, SG2ADA_REPO, SG3_REPO, GeneratorConfig, StyleGAN2Network
from gan_adapters.stylegan3 import StyleGAN3Config, StyleGAN3Network

TRAINABLE = ("all", "mapping-frozen", "synthesis")

# Size-like constructor arguments of NVlabs/stylegan2-ada-pytorch training/networks.py Generator and
# what a network can sensibly have; the published ones use at most: z_dim = w_dim = 512, 1024 px,
# 8 mapping layers, channel_base 32768, channel_max 512, 4 float16 resolutions.
ARGUMENT_BOUNDS = {
    "generator": {"z_dim": Bound(0, 4096), "c_dim": Bound(0, 100_000), "w_dim": Bound(1, 4096),
                  "img_resolution": Bound(4, 4096), "img_channels": Bound(1, 64)},
    "mapping_kwargs": {"num_layers": Bound(0, 64), "embed_features": Bound(1, 4096),
                       "layer_features": Bound(1, 4096)},
    "synthesis_kwargs": {"channel_base": Bound(1, 2**20), "channel_max": Bound(1, 4096),
                         "num_fp16_res": Bound(0, 16), "kernel_size": Bound(1, 15)},
}


@dataclass
class StyleGAN2Options:
    """How the loaded generator is sampled and trained (see the module docstring)."""

    noise_mode: str = "random"
    truncation_psi: float = 1.0
    truncation_cutoff: int | None = None
    force_fp32: bool = True
    trainable: str = "all"

    @classmethod
    def from_kwargs(cls, opts: dict[str, Any], name: str = "the file") -> StyleGAN2Options:
        unknown = set(opts) - {f.name for f in fields(cls)}
        if unknown:
            raise refused_options(name, "a StyleGAN2-ADA / StyleGAN3 network", unknown)
        options = cls(**opts)
        if options.noise_mode not in NOISE_MODES:
            raise UserError(f"noise_mode must be one of {list(NOISE_MODES)}, not {options.noise_mode!r}")
        if options.trainable not in TRAINABLE:
            raise UserError(f"trainable must be one of {list(TRAINABLE)}, not {options.trainable!r}")
        if not is_number(options.truncation_psi):
            raise UserError(f"truncation_psi must be a finite number (1 = no truncation), not "
                            f"{options.truncation_psi!r}")
        cutoff = options.truncation_cutoff
        if cutoff is not None and not (is_integer(cutoff) and cutoff >= 0):
            raise UserError(f"truncation_cutoff must be None or a layer count >= 0, not {cutoff!r}")
        if not isinstance(options.force_fp32, bool):
            raise UserError(f"force_fp32 must be True or False, not {options.force_fp32!r}")
        return options


class Snapshot:
    """The loaded pickle (top-level dict of records), kept for writing back.

    Left as read (save() restores what it swaps in), so copies of the generator, such as the loop's
    EMA made with copy.deepcopy, share it instead of duplicating D and the rest.
    """

    def __init__(self, data: dict, name: str):
        self.data = data
        self.name = name

    def __deepcopy__(self, memo: dict) -> Snapshot:
        return self


class StyleGAN2Generator(torch.nn.Module):
    """`Generator` interface over a StyleGAN2(-ADA) or StyleGAN3 G_ema. `.network` is the clean-room
    generator with the original forward(z, c, truncation_psi, truncation_cutoff, noise_mode, force_fp32)."""

    def __init__(self, network: StyleGAN2Network | StyleGAN3Network, snapshot: Snapshot, options: StyleGAN2Options):
        super().__init__()
        self.network = network
        self.snapshot = snapshot
        self.options = options
        self.z_dim = network.z_dim
        self.c_dim = network.c_dim
        self.resolution = network.img_resolution
        self.channels = network.img_channels
        self.data_shape = (network.img_channels, network.img_resolution, network.img_resolution)
        for name, p in network.named_parameters():
            p.requires_grad_(self._is_trainable(name))

    def _is_trainable(self, name: str) -> bool:
        if self.options.trainable == "all":
            return True
        if name.startswith("mapping."):
            return False
        return self.options.trainable == "mapping-frozen" or ".affine." not in name

    def train(self, mode: bool = True) -> StyleGAN2Generator:
        super().train(mode)
        if self.options.trainable != "all":
            self.network.mapping.eval()
        return self

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I) [n, z_dim], drawn on the torch.Generator's device (CPU without one)."""
        return standard_normal((n, self.z_dim), generator)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        return uniform_one_hot(n, self.c_dim, generator)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Images [N, C, R, R] (float32, nominally in [-1, 1]; not clamped), differentiable."""
        if self.c_dim > 0 and c is None:
            raise ValueError(f"this generator is conditional ({self.c_dim} classes): pass one-hot labels c")
        if c is None:
            c = z.new_zeros([z.shape[0], 0])
        o = self.options
        return self.network(z, c, truncation_psi=o.truncation_psi, truncation_cutoff=o.truncation_cutoff,
                            noise_mode=o.noise_mode, force_fp32=o.force_fp32)

    def describe(self) -> str:
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.parameters())
        cond = f"{self.c_dim} classes" if self.c_dim else "unconditional"
        return (f"{self.network.summary()}, {cond}, z_dim {self.z_dim}, w_dim {self.network.w_dim}, "
                f"{self.network.num_ws} ws; {n_train:,} of {n_all:,} parameters trainable "
                f"({self.options.trainable}); from {self.snapshot.name}")

    def save(self, path: str | os.PathLike, keep_G: bool = False, overwrite: bool = False) -> None:
        """Write the loaded pickle back with this network's weights as G_ema (and G unless keep_G).

        Everything else is written as it was read, so saving unchanged weights reproduces the input
        file byte for byte. Atomic; an existing file is refused unless overwrite.
        """
        data = self.snapshot.data
        records = [data[k] for k in (("G_ema",) if keep_G else ("G_ema", "G")) if k in data]
        originals = [OrderedDict((k, v.clone()) for k, v in r.state_dict().items()) for r in records]
        weights = self.network.state_dict()
        try:
            # Copy into the stored tensors (their storages keep the headers they were read with),
            # write, then restore: the kept snapshot never changes.
            for record, stored in zip(records, originals):
                record.load_state_dict({k: weights[k].detach().to("cpu", v.dtype) for k, v in stored.items()})
            nvpickle.dump(data, path, overwrite=overwrite)
        finally:
            for record, stored in zip(records, originals):
                record.load_state_dict(stored)


STYLEGAN3 = "stylegan3-t/r"  # StyleGAN3-T/R, NVlabs/stylegan3 training/networks_stylegan3.py


def stylegan_kind(record: nvpickle.PersistentObject) -> str:
    """Which code wrote a stored Generator: SG2ADA_REPO, SG3_REPO (its StyleGAN2 config) or STYLEGAN3.

    Told from the stored module tree, never from the module source: StyleGAN3 synthesis networks have
    an `input` layer; StyleGAN2 blocks written by NVlabs/stylegan3 store `fused_modconv_default`,
    those of stylegan2-ada-pytorch do not (which also nests its synthesis kwargs in `synthesis_kwargs`).
    """
    synthesis = record.children().get("synthesis")
    parts = nvpickle.node_children(synthesis) if synthesis is not None else {}
    if "input" in parts:
        return STYLEGAN3
    block = parts.get("b4")
    if "synthesis_kwargs" not in record.init_kwargs and "fused_modconv_default" in (nvpickle.node_state(block) or {}):
        return SG3_REPO
    return SG2ADA_REPO


def stylegan_snapshot_kind(data: Any) -> str | None:
    """What a loaded snapshot's G_ema is, in words ('StyleGAN2-ADA', 'StyleGAN2 (NVlabs/stylegan3)',
    'StyleGAN3-T', 'StyleGAN3-R'), or None if the file has no stored Generator under G_ema. Nothing is
    built; for messages and `refiner inspect`."""
    record = data.get("G_ema") if isinstance(data, dict) else None
    if not isinstance(record, nvpickle.PersistentObject) or record.class_name != "Generator":
        return None
    kind = stylegan_kind(record)
    if kind == STYLEGAN3:
        try:
            return f"StyleGAN3-{StyleGAN3Config.from_init_kwargs(record.init_args, record.init_kwargs).config_name}"
        except (ValueError, TypeError):
            return "StyleGAN3"
    return "StyleGAN2 (NVlabs/stylegan3)" if kind == SG3_REPO else "StyleGAN2-ADA"


def build_network(record: nvpickle.PersistentObject) -> StyleGAN2Network | StyleGAN3Network:
    """The clean-room generator for a stored Generator's constructor arguments (ValueError if they do
    not fit), not yet loaded with its weights."""
    kind = stylegan_kind(record)
    if kind == STYLEGAN3:
        return StyleGAN3Network(StyleGAN3Config.from_init_kwargs(record.init_args, record.init_kwargs))
    return StyleGAN2Network(GeneratorConfig.from_init_kwargs(record.init_args, record.init_kwargs, repo=kind))


def stylegan2_from_snapshot(data: Any, options: StyleGAN2Options, name: str = "<snapshot>",
                            device: torch.device | str | None = None) -> StyleGAN2Generator:
    """The generator of an already loaded snapshot (what `nvpickle.load` returned)."""
    record = data.get("G_ema") if isinstance(data, dict) else None
    if not isinstance(record, nvpickle.PersistentObject):
        raise UserError(f"{name}: no StyleGAN2-ADA/StyleGAN3 generator (G_ema) in this file; found "
                        f"{nvpickle.describe(data)}. Give a StyleGAN2-ADA or StyleGAN3 network snapshot "
                        "(network-snapshot-*.pkl)")
    if record.class_name != "Generator":
        raise UserError(f"{name}: G_ema is a {record.class_name}, not a StyleGAN2-ADA/StyleGAN3 Generator")
    try:
        stored_kwargs = dict(record.init_kwargs)
        for group, bounds in ARGUMENT_BOUNDS.items():  # synthesis arguments: nested (ADA) or flat (stylegan3)
            values = stored_kwargs if group == "generator" else stored_kwargs.get(group, stored_kwargs)
            check_ranges(name, "G_ema", values if isinstance(values, dict) else {}, bounds)
        shapes = meta_shapes(lambda: build_network(record))  # checked against the file before allocating
    except (ValueError, TypeError) as e:
        raise UserError(f"{name}: G_ema's constructor arguments do not describe a StyleGAN2-ADA, StyleGAN2 "
                        f"(NVlabs/stylegan3) or StyleGAN3-T/R generator ({e}); StyleGAN2 (TensorFlow) and "
                        "StyleGAN-XL files are not supported") from None
    stored = record.state_dict()
    problems = shape_mismatch(shapes, {k: tuple(v.shape) for k, v in stored.items()})
    if problems:
        raise UserError(f"{name}: G_ema's weights do not match a generator built from its constructor arguments "
                        f"({problems}); the file may come from another StyleGAN version")
    network = build_network(record)
    network.load_state_dict(stored)
    network.eval()
    adapter = StyleGAN2Generator(network, Snapshot(data, name), options).eval()
    return adapter.to(device) if device is not None else adapter


def load_stylegan2(source: nvpickle.Source, device: torch.device | str | None = None,
                   **opts: Any) -> StyleGAN2Generator:
    """Load a StyleGAN2-ADA or StyleGAN3 snapshot (path, URL, bytes or binary file) as a `StyleGAN2Generator`.

    opts: noise_mode, truncation_psi, truncation_cutoff, force_fp32, trainable (module docstring).
    The pickle's other networks (D, augment_pipe) stay on the CPU, untouched.
    """
    options = StyleGAN2Options.from_kwargs(opts, source_name(source))
    return stylegan2_from_snapshot(nvpickle.load(source), options, source_name(source), device)


def source_name(source: nvpickle.Source) -> str:
    """How to name a source in messages: its path or URL, a file object's name, else '<data>'."""
    if isinstance(source, (str, os.PathLike)):
        return str(os.fspath(source))
    return str(getattr(source, "name", "<data>"))
