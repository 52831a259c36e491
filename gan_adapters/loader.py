"""`load_generator`: recognise what a source holds and load it behind the `Generator` interface.

One entry per kind of file in `_PICKLE_KINDS` (test on the loaded pickle, builder). Supported now:
- a network pickle whose top-level dict has `G_ema`: StyleGAN2-ADA, or StyleGAN2/StyleGAN3-T/R written by
  NVlabs/stylegan3 (gan_adapters/stylegan2_adapter.py);
- a folder with config.json + pytorch_model.bin: BigGAN-deep (gan_adapters/biggan.py; option `truncation`);
  with pytorch_model.bin only: a DMD2 checkpoint folder (as the state-dict file below);
- a dict whose `ema` is an EDM preconditioner: a one-step generator (refiner distill, Diff-Instruct and
  SiD snapshots; gan_adapters/onestep.py; option `sigma_init`, read from refiner's metadata if present);
- a torch state-dict file: DMD2's or a consistency model's one-step generator (gan_adapters/published.py;
  options `sigma_init`, `resolution`). An EDM2 teacher pickle is refused with a pointer.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Union

import torch

from common.devices import resolve_device
from common.errors import UserError
from fileformats import nvpickle
from fileformats.torchfiles import is_torch_checkpoint, local_path
from gan_adapters.base import Generator, refused_options
from gan_adapters.biggan import is_biggan_folder, load_biggan
from gan_adapters.onestep import is_onestep_snapshot, onestep_from_snapshot
from gan_adapters.published import edm2_generator, is_edm2_without_metadata, load_published
from gan_adapters.stylegan2_adapter import StyleGAN2Options, source_name, stylegan2_from_snapshot

Builder = Callable[[Any, str, Union[torch.device, str, None], dict], Generator]

_PICKLE_KINDS: list[tuple[Callable[[Any], bool], Builder]] = [
    (lambda data: isinstance(data, dict) and "G_ema" in data,
     lambda data, name, device, opts: stylegan2_from_snapshot(data, StyleGAN2Options.from_kwargs(opts, name),
                                                              name, device)),
    (is_edm2_without_metadata, edm2_generator),
    (is_onestep_snapshot, lambda data, name, device, opts: onestep_from_snapshot(data, name, device, **opts)),
]


def load_generator(source: nvpickle.Source, device: torch.device | str | None = None,
                   **opts: Any) -> Generator:
    """The generator stored in `source` (path, URL, bytes or binary file), on `device`.

    opts are passed to the family's loader (StyleGAN2-ADA: noise_mode, truncation_psi,
    truncation_cutoff, force_fp32, trainable; one-step EDM: sigma_init; DMD2 / consistency-model state
    dicts: sigma_init, resolution). A file of no supported kind
    is a UserError saying what the file holds.
    """
    name = source_name(source)
    device = resolve_device(device)
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        weights = os.path.join(source, "pytorch_model.bin")
        if not is_biggan_folder(source) and is_torch_checkpoint(weights):  # a DMD2 checkpoint folder
            return load_published(weights, name, device, **opts)
        if not is_biggan_folder(source):
            missing = " and ".join(f for f in ("config.json", "pytorch_model.bin")
                                   if not os.path.isfile(os.path.join(source, f)))
            raise UserError(f"{name} is a folder without {missing}; the only generators stored as a folder are "
                            "BigGAN-deep (pytorch-pretrained-biggan: config.json and pytorch_model.bin) and DMD2 "
                            "checkpoints (pytorch_model.bin)")
        unknown = sorted(set(opts) - {"truncation"})
        if unknown:
            raise refused_options(name, "a BigGAN-deep folder", unknown)
        return load_biggan(source, device, **opts)
    path = local_path(source)
    if is_torch_checkpoint(path):
        return load_published(path, name, device, **opts)
    data = nvpickle.load(source)
    for matches, build in _PICKLE_KINDS:
        if matches(data):
            return build(data, name, device, opts)
    raise UserError(f"{name}: no generator that can be loaded; found {nvpickle.describe(data)}. "
                    "Give a StyleGAN2-ADA/StyleGAN3 network snapshot (.pkl with G_ema) or a one-step EDM snapshot "
                    "('ema')")
