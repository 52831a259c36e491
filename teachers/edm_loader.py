"""Load an EDM network pickle (EDM snapshots, the published EDM teachers, Diff-Instruct and SiD
snapshots) into our clean-room networks, behind the `Denoiser` interface.

Such a pickle is a dict whose `ema` entry is a persistent preconditioner (EDMPrecond, VPPrecond,
VEPrecond or iDDPMPrecond) wrapping a SongUNet or DhariwalUNet (docs/pickle_formats.md §3). The
file is read by the safe reader (fileformats.nvpickle, nothing in it is executed); our network is
rebuilt from the record's `_init_kwargs` and takes its tensors 1:1, without a second copy in memory.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from common.devices import resolve_device
from common.errors import UserError
from fileformats import nvpickle
from fileformats.arguments import Bound, check_ranges, meta_shapes, shape_mismatch
from fileformats.sources import file_sha256, open_source
from fileformats.torchfiles import is_torch_checkpoint
from teachers import edm2
from teachers.base import as_sigma
from teachers.edm_layers import skip_init
from teachers.edm_precond import PRECONDS, Precond

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Size-like constructor arguments of the preconditioners and U-Nets (NVlabs/edm training/networks.py)
# and what a network can sensibly have; the published ones use at most: resolution 64, 3 channels,
# 1000 labels, augment_dim 9, model_channels 192, channel_mult of 4 entries up to 4, 4 blocks.
ARGUMENT_BOUNDS = {
    "img_resolution": Bound(1, 4096), "img_channels": Bound(1, 64), "label_dim": Bound(0, 100_000),
    "augment_dim": Bound(0, 64), "model_channels": Bound(1, 4096), "channel_mult": Bound(1, 64, items=8),
    "channel_mult_emb": Bound(1, 64), "channel_mult_noise": Bound(1, 64), "num_blocks": Bound(1, 64),
    "attn_resolutions": Bound(1, 4096, items=16), "M": Bound(1, 100_000),
}
_POSITIONAL = ("img_resolution", "img_channels", "label_dim")

PLACEHOLDER_SOURCE = "# module source not included: written by refiner from its own networks\n"


class EDMTeacher(nn.Module):
    """An EDM preconditioner as a `Denoiser`: D(x, σ, labels, augment_labels) in x's dtype.

    `network` is the raw preconditioner (`network(x, sigma, class_labels, ...)` as in EDM);
    `record` is the file's `PersistentObject` for it (module source, attributes, `_init_kwargs`), so a
    snapshot with the same module source can be written later. On CPU the network's tensors are the
    record's tensors (no copy): teachers are frozen, never modify them in place.
    `dtype`: reduced precision for the U-Net on CUDA (None: fp16 iff the file says use_fp16).
    `encoder`: between the teacher's data space and uint8 pixels (teachers.edm2.Encoder); pixels in
    [-1, 1] unless an EDM2 file names another encoder.
    """

    def __init__(self, network: Precond, record: nvpickle.PersistentObject | None = None,
                 dtype: torch.dtype | None = None, encoder: edm2.Encoder | None = None):
        super().__init__()
        self.network = network
        self.record = record
        self.dtype = dtype
        self.encoder = encoder if encoder is not None else edm2.StandardRGBEncoder()  # data space <-> pixels
        self.data_shape = (network.img_channels, network.img_resolution, network.img_resolution)
        self.label_dim = network.label_dim
        self.sigma_min = float(network.sigma_min)
        self.sigma_max = float(network.sigma_max)
        self.sigma_data = float(getattr(network, "sigma_data", 0.5))  # VP/VE/iDDPM: EDM's image scaling
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        return self.network(x, sigma, labels, dtype=self.dtype, augment_labels=augment_labels).to(x.dtype)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.network.round_sigma(sigma)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None (the file's choice), a name in DTYPES or one of its torch dtypes (floating point: the U-Net's
    precision)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def find_ema(obj: Any, name: str) -> nvpickle.PersistentObject:
    """The `ema` record of a snapshot dict, or a UserError that says what the file is instead."""
    if isinstance(obj, dict) and {"G", "D", "G_ema"} <= set(obj):
        from gan_adapters.stylegan2_adapter import stylegan_snapshot_kind

        kind = stylegan_snapshot_kind(obj) or "StyleGAN2-ADA/StyleGAN3"
        raise UserError(f"{name}: this is a {kind} snapshot (keys G, D, G_ema), a GAN, not an EDM "
                        "teacher; use it as --generator of `refiner refine` or `refiner metrics`")
    if not isinstance(obj, dict) or not isinstance(obj.get("ema"), nvpickle.PersistentObject):
        raise UserError(f"{name}: expected an EDM network pickle (a dict with a network under 'ema'), "
                        f"found {nvpickle.describe(obj)}; give an EDM, Diff-Instruct or SiD snapshot")
    return obj["ema"]


def build_network(record: nvpickle.PersistentObject, name: str = "the file") -> Precond | edm2.Precond:
    """Our preconditioner (EDM's four, or EDM2's `Precond`) rebuilt from a record's `_init_kwargs`,
    holding the record's tensors.

    The network is constructed without drawing weights (`skip_init`) and takes the stored tensors by
    reference (`load_state_dict(assign=True)`): float32 tensors are shared with the record, not copied;
    reduced-precision ones (EDM2 stores float16) are widened to float32. Before that, the stored arguments
    must lie in ARGUMENT_BOUNDS and the network built from them on the meta device must have the stored
    tensors' shapes (fileformats.arguments), so nothing is allocated for arguments that do not fit the file."""
    cls = PRECONDS.get(record.class_name) or (edm2.Precond if edm2.is_edm2(record) else None)
    if cls is None:
        raise UserError(f"{name}: 'ema' is a {record.class_name}, not an EDM preconditioner "
                        f"({', '.join(PRECONDS)}) or EDM2's Precond; give an EDM or EDM2 network pickle")
    arguments = {**dict(zip(_POSITIONAL, record.init_args)), **record.init_kwargs}
    check_ranges(name, record.class_name, arguments, ARGUMENT_BOUNDS)
    tensors = record.state_dict()

    def build() -> Precond | edm2.Precond:
        with skip_init():
            return cls(*record.init_args, **record.init_kwargs)

    try:
        expected = meta_shapes(build)  # checked against the file before anything is allocated
    except (TypeError, ValueError) as e:
        raise UserError(f"{name}: cannot rebuild {record.class_name} from its stored arguments ({e}); "
                        "the network was made by a modified EDM code base that refiner does not support"
                        ) from None
    details = shape_mismatch(expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if details:
        raise UserError(f"{name}: the stored weights do not fit {record.class_name} built from its "
                        f"arguments ({details}); the file is corrupt or from a modified EDM code base")
    network = build()
    network.load_state_dict(tensors, strict=True, assign=True)
    return network.float().eval()


def load_teacher(source: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None) -> EDMTeacher:
    """Load the `ema` network of an EDM-style pickle (path or URL) as a frozen `EDMTeacher` (eval mode,
    no gradients on its weights).

    device: None = CPU, 'auto' = CUDA when available. dtype: U-Net precision on CUDA ('bf16', 'fp16',
    'fp32' or a torch.dtype); None keeps the file's choice (fp16 iff use_fp16). `identity` = {'name':
    source, 'sha256': of the file's bytes} is what training checkpoints record of their teacher."""
    from gan_adapters.biggan import is_biggan_folder  # gan_adapters builds on this module

    if isinstance(source, (str, os.PathLike)) and is_biggan_folder(source):
        raise UserError(f"{os.fspath(source)} is a BigGAN-deep folder, a GAN, not a diffusion teacher: load it with "
                        "gan_adapters.load_generator (on the command line: --generator)")
    local = open_source(source)  # a path or URL, else a UserError
    name = os.fspath(source)
    if is_torch_checkpoint(str(local)):
        raise UserError(f"{name} is a torch state dict (a one-step generator such as DMD2's or a consistency "
                        "model's), not a diffusion teacher: give it as --generator to refine or metrics, and an "
                        "EDM or EDM2 network pickle as --teacher")
    teacher = teacher_from_pickle(nvpickle.load(local), name, device, dtype)
    teacher.identity = {"name": name, "sha256": file_sha256(local)}
    return teacher


def teacher_from_pickle(data: Any, name: str, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> EDMTeacher:
    """`load_teacher` for a pickle already read by `nvpickle.load`. A one-step generator that refiner wrote
    (its metadata records σ_init) has the teacher's layout but is no denoiser: it is refused."""
    from gan_adapters.onestep import METADATA_KEY  # gan_adapters builds on this module

    meta = data.get(METADATA_KEY) if isinstance(data, dict) else None
    if isinstance(meta, dict) and "sigma_init" in meta:
        raise UserError(f"{name} is a one-step generator written by refiner (σ_init {meta['sigma_init']:g}), not a "
                        "diffusion model: give it as --init to distill or --generator to refine and metrics, and "
                        "the EDM network it was distilled from as --teacher")
    record = find_ema(data, name)
    encoder = edm2.pixel_encoder(data, name)  # latent EDM2 teachers are refused until a VAE is available
    network = build_network(record, name).to(resolve_device(device))
    return EDMTeacher(network, record, resolve_dtype(dtype), encoder)


def network_record(module: nn.Module, init_kwargs: dict | None = None,
                   module_src: str = PLACEHOLDER_SOURCE) -> nvpickle.PersistentObject:
    """A record in NVIDIA's layout for one of our networks (for tests and benchmarks).

    Every module of ours becomes a persistent record whose state is its `__dict__` (children as
    records, ModuleDicts kept as torch containers, tensors as frozen parameters/buffers); the top
    record gets `init_kwargs`, inner ones empty arguments. With the placeholder source NVIDIA's own
    code cannot load the result; refiner's loader can."""
    def convert(m: nn.Module, kwargs: dict) -> Any:
        state = dict(m.__dict__)
        state["training"] = False
        state["_parameters"] = {k: None if p is None else nn.Parameter(p.detach(), requires_grad=False)
                                for k, p in m._parameters.items()}
        state["_buffers"] = {k: None if b is None else b.detach() for k, b in m._buffers.items()}
        state["_modules"] = {k: None if c is None else convert(c, {}) for k, c in m._modules.items()}
        if isinstance(m, nn.ModuleDict):
            container = nn.ModuleDict()
            container.__dict__.update(state)
            return container
        state["_init_args"], state["_init_kwargs"] = (), dict(kwargs)
        return nvpickle.PersistentObject(class_name=type(m).__name__, module_src=module_src, version=6,
                                         state=state)

    return convert(module, init_kwargs or {})
