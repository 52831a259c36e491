"""A one-step generator made of an EDM denoiser, as Diff-Instruct and SiD distil them.

    G(z, c) = D_θ(σ_init·z; σ_init, c),   z ~ N(0, I) of the image's shape,

where D_θ is a trainable copy of the teacher's preconditioned network (EDMPrecond etc.), initialised
from the teacher (docs/diff_instruct.md §1.4; σ_init = 1.0 in Diff-Instruct's recipe, 2.5 in SiD's).
The official code also passes augment_labels = 0; the augmentation mapping has no bias, so that equals
leaving them out (None), which is what we do.

Snapshot format (`save`): the Diff-Instruct / SiD layout, a pickle of a dict whose `ema` is the network
as a `torch_utils.persistence` object. It is the teacher file's record (module source, attributes,
`_init_kwargs`, written the same way) with the generator's tensors in place of the teacher's, so EDM's
generate.py, Diff-Instruct and SiD's generate_onestep.py load it (`pickle.load(f)['ema']`). Beside it a
plain dict `refiner` = {'format', 'sigma_init', 'generator'}: those loaders only read `ema`; ours reads
σ_init from it. Diff-Instruct and SiD snapshots carry no σ_init, so it must be given to load them.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from common.values import is_number
from fileformats import nvpickle
from gan_adapters.base import refused_options, standard_normal, uniform_one_hot
from teachers import edm2
from teachers.edm_layers import UNetBlock
from teachers.edm_loader import EDMTeacher, build_network
from teachers.edm_precond import PRECONDS, Precond

METADATA_KEY = "refiner"
FORMAT = "refiner-one-step-generator/1"
PUBLISHED_SIGMA_INIT = "1.0 for Diff-Instruct, 2.5 for SiD, 80 for DMD2 (whose input is 80·z)"


class _Template:
    """The network record a snapshot is written from. Shared, not copied, by copies of the generator
    (the loop's EMA is a deep copy): it is only read."""

    def __init__(self, record: nvpickle.PersistentObject, name: str):
        self.record = record
        self.name = name

    def __deepcopy__(self, memo: dict) -> _Template:
        return self


def set_dropout(module: nn.Module, p: float) -> None:
    """Set the dropout probability of every EDM / EDM2 U-Net block (their `dropout` attribute) to p."""
    for m in module.modules():
        if isinstance(m, (UNetBlock, edm2.Block)):
            m.dropout = float(p)


class OneStepGenerator(nn.Module):
    """`Generator` interface over an EDM preconditioner used in one step: G(z, c) = D(σ_init·z; σ_init, c).

    `network` is trainable; it runs in float32 (the training loop's autocast decides the precision of
    its operations), whatever `use_fp16` the file says."""

    def __init__(self, network: Precond, template: nvpickle.PersistentObject, sigma_init: float,
                 name: str = "<network>"):
        super().__init__()
        if not is_number(sigma_init) or not sigma_init > 0:
            raise UserError(f"sigma_init must be a finite number > 0 (got {sigma_init!r}); Diff-Instruct uses 1.0, "
                            "SiD 2.5, DMD2 80")
        self.network = network
        self.template = _Template(template, name)
        self.sigma_init = float(sigma_init)
        self.channels = network.img_channels
        self.resolution = network.img_resolution
        self.data_shape = (self.channels, self.resolution, self.resolution)
        self.z_dim = self.channels * self.resolution * self.resolution  # z has the image's shape
        self.c_dim = network.label_dim

    @classmethod
    def from_teacher(cls, teacher: EDMTeacher, sigma_init: float, name: str = "<teacher>") -> OneStepGenerator:
        """A trainable float32 copy of the teacher's network (on the teacher's device)."""
        if teacher.record is None:
            raise UserError(f"{name}: the teacher has no network record to write snapshots from; "
                            "load it from an EDM network pickle (teachers.edm_loader.load_teacher)")
        network = copy.deepcopy(teacher.network).float().requires_grad_(True)
        return cls(network, teacher.record, sigma_init, name)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I) [n, C, H, W], drawn on the torch.Generator's device (CPU without one)."""
        return standard_normal((n, *self.data_shape), generator)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        return uniform_one_hot(n, self.c_dim, generator)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Images [N, C, H, W] in float32, differentiable in the network's weights."""
        if self.c_dim > 0 and c is None:
            raise ValueError(f"this generator is conditional ({self.c_dim} classes): pass one-hot labels c")
        sigma = torch.full([z.shape[0]], self.sigma_init, device=z.device, dtype=torch.float32)
        return self.network(self.sigma_init * z, sigma, c, force_fp32=True)

    def describe(self) -> str:
        inner = type(getattr(self.network, "model", None) or self.network.unet).__name__  # EDM2: unet
        cond = f"{self.c_dim} classes" if self.c_dim else "unconditional"
        n = sum(p.numel() for p in self.parameters())
        return (f"one-step generator {type(self.network).__name__}({inner}) "
                f"{self.resolution}x{self.resolution}x{self.channels}, {cond}, σ_init {self.sigma_init:g}, "
                f"{n:,} parameters; from {self.template.name}")

    def metadata(self) -> dict[str, Any]:
        """The plain-data entry written beside `ema` (EDM / Diff-Instruct / SiD loaders ignore it)."""
        return {"format": FORMAT, "sigma_init": self.sigma_init,
                "generator": "G(z, c) = ema(sigma_init * z, sigma_init, c), z ~ N(0, I) of the image shape"}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write {'ema': network record, 'refiner': metadata} (module docstring). Atomic; an existing
        file is refused unless overwrite."""
        record = copy.deepcopy(self.template.record)
        weights = self.network.state_dict()
        record.load_state_dict({k: weights[k].detach().to("cpu", v.dtype) for k, v in record.state_dict().items()})
        nvpickle.dump({"ema": record, METADATA_KEY: self.metadata()}, path, overwrite=overwrite)


def is_onestep_snapshot(data: Any) -> bool:
    """A dict whose `ema` is an EDM or EDM2 preconditioner record (our, Diff-Instruct, SiD and EDM snapshots)."""
    ema = data.get("ema") if isinstance(data, dict) else None
    return isinstance(ema, nvpickle.PersistentObject) and (ema.class_name in PRECONDS or edm2.is_edm2(ema))


def onestep_from_snapshot(data: dict, name: str, device: torch.device | str | None = None,
                          sigma_init: float | None = None, **unknown: Any) -> OneStepGenerator:
    """The one-step generator of a loaded snapshot. σ_init: our metadata's, else the given value (a given value
    that differs from the recorded one is refused)."""
    stored = data.get(METADATA_KEY)
    stored = stored.get("sigma_init") if isinstance(stored, dict) else None
    if sigma_init is None and stored is None:
        what = ("an EDM diffusion model (it has loss_fn); a one-step generator made from it"
                if "loss_fn" in data else f"an EDM network ('ema' = {data['ema'].class_name}) without "
                                          "refiner's metadata; if it is a one-step generator, it")
        raise UserError(f"{name} holds {what} needs its σ_init: give --sigma-init ({PUBLISHED_SIGMA_INIT}). "
                        "A GAN is a StyleGAN2-ADA snapshot (.pkl with G_ema) or a BigGAN-deep folder")
    if unknown:
        raise refused_options(name, "a one-step EDM generator", unknown)
    if sigma_init is not None and stored is not None and sigma_init != stored:
        raise UserError(f"{name} records σ_init {stored:g}, the value it was trained at; --sigma-init {sigma_init:g} "
                        "would feed it another noise level: leave --sigma-init out")
    network = build_network(data["ema"], name)
    network = copy.deepcopy(network).float()  # own tensors: training must not write into the loaded record
    generator = OneStepGenerator(network, data["ema"], sigma_init if sigma_init is not None else stored, name)
    return generator.eval().to(device) if device is not None else generator.eval()
