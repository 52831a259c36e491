"""What a network file is and how each refiner command can use it (shown by `refiner inspect`)."""

from __future__ import annotations

from typing import Any

from common.errors import UserError
from fileformats import nvpickle
from gan_adapters import published
from gan_adapters.onestep import METADATA_KEY, PUBLISHED_SIGMA_INIT
from gan_adapters.stylegan2_adapter import stylegan_snapshot_kind
from teachers import edm2
from teachers.edm_precond import PRECONDS

NOT_A_TEACHER = "no: not a diffusion model (the teacher must be an EDM or EDM2 network pickle)"
TEACHER = {"refine": "yes, as --teacher", "distill": "yes, as --teacher", "sample": "yes, as --teacher"}


def _uses(kind: str, **commands: str) -> dict[str, Any]:
    order = ("refine", "distill", "sample", "metrics")
    return {"kind": kind, "commands": {c: commands[c] for c in order}}


def pickle_usage(data: Any) -> dict[str, Any]:
    """Kind and per-command use of a loaded network pickle."""
    gan = stylegan_snapshot_kind(data)
    if gan is not None:
        return _uses(f"{gan} network snapshot (G_ema)", refine="yes, as --generator with an EDM --teacher; the "
                     "refined pickle keeps this layout (--in-place replaces FILE and keeps FILE.bak)",
                     distill=NOT_A_TEACHER, sample=NOT_A_TEACHER, metrics="yes, as --generator")
    ema = data.get("ema") if isinstance(data, dict) else None
    edm_layout = isinstance(ema, nvpickle.PersistentObject) and ema.class_name in PRECONDS
    meta = data.get(METADATA_KEY) if isinstance(data, dict) else None
    if (edm_layout or edm2.is_edm2(ema)) and isinstance(meta, dict) and "sigma_init" in meta:
        return _uses(f"one-step generator written by refiner (σ_init {meta['sigma_init']:g})",
                     refine="yes, as --generator", distill="yes, as --init (the starting generator)",
                     sample="yes, as --teacher (sampled in one step)", metrics="yes, as --generator")
    if edm2.is_edm2(ema):
        try:
            edm2.pixel_encoder(data, "this file")
        except UserError:
            latent = "no: a latent EDM2 teacher needs the Stable Diffusion VAE, which refiner does not include"
            return _uses("EDM2 latent diffusion model (StabilityVAEEncoder)", refine=latent, distill=latent,
                         sample=latent, metrics=latent)
        return _uses("EDM2 pixel-space diffusion model (teacher)", **TEACHER,
                     metrics="no: a diffusion model, not a generator (measure `sample` output with --images)")
    if edm_layout:
        what = "EDM diffusion model" if "loss_fn" in data else "EDM-layout network without refiner metadata"
        return _uses(f"{what} ({ema.class_name}; a Diff-Instruct / SiD one-step snapshot has the same layout)",
                     **TEACHER, metrics="as --generator if it is a one-step generator, with its σ_init "
                     f"({PUBLISHED_SIGMA_INIT})")
    return _uses(f"not a network refiner uses ({nvpickle.describe(data)})", refine="no", distill="no",
                 sample="no", metrics="no")


def biggan_folder_usage() -> dict[str, Any]:
    """A BigGAN-deep folder (config.json + pytorch_model.bin)."""
    no = "no: a GAN, not a diffusion model"
    return _uses("BigGAN-deep folder (pytorch-pretrained-biggan: config.json + pytorch_model.bin)",
                 refine="yes, as --generator with an EDM --teacher (--truncation; --resize-to-teacher when the "
                        "teacher is smaller); the refined folder keeps this layout",
                 distill=no, sample=no, metrics="yes, as --generator (--truncation)")


def torchscript_usage() -> dict[str, Any]:
    """A TorchScript archive: compiled code that refiner runs only as an Inception detector."""
    no = "no: TorchScript holds compiled code, not a network refiner reads (give the network's pickle or state dict)"
    return _uses("TorchScript archive (compiled code; NVIDIA's Inception detector inception-2015-12-05.pt is one)",
                 refine=no, distill=no, sample=no,
                 metrics="as --detector if it is an Inception network (loaded when metrics runs, not by inspect)")


def _size_is_all_that_is_missing(tensors: dict, name: str) -> bool:
    """Whether a consistency-model state dict loads once its image size is given (the weights do not depend on
    it; a large power of two fits any number of levels)."""
    try:
        published.infer_consistency_unet(tensors, name, resolution=1 << 16)
    except UserError:
        return False
    return True


def state_dict_usage(path: str, name: str) -> dict[str, Any]:
    """Kind, inferred architecture and per-command use of a torch state-dict file."""
    tensors = published.read_state_dict(path, name)
    needs = ""  # what the commands need besides the file
    info: dict[str, Any] = {"num_tensors": len(tensors), "num_elements": sum(t.numel() for t in tensors.values()),
                            "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})}
    if "model.map_layer0.weight" in tensors and "model.out_conv.weight" in tensors:
        info["architecture"] = published.infer_edm_dhariwal(tensors, name)
        kind = "DMD2 one-step generator: state dict of EDMPrecond(DhariwalUNet), fed 80·z at σ = 80"
    elif "time_embed.0.weight" in tensors and "input_blocks.0.0.weight" in tensors:
        kind = "consistency-model one-step generator: guided-diffusion UNetModel state dict (σ_max 80)"
        try:
            info["architecture"] = published.infer_consistency_unet(tensors, name, None)
        except UserError as e:
            info["architecture"] = str(e)
            if not _size_is_all_that_is_missing(tensors, name):
                return {**_uses(kind, refine="no (see architecture)", distill="no (see architecture)",
                                sample="no (see architecture)", metrics="no (see architecture)"), **info}
            needs = " with --resolution N, the image size it was trained at (the weights do not record it)"
    elif "generator.gen_z.weight_orig" in tensors and "embeddings.weight" in tensors:
        give = "yes: give the folder that holds this file and its config.json as --generator"
        return {**_uses("BigGAN-deep weights (pytorch-pretrained-biggan's pytorch_model.bin)", refine=give,
                        distill="no: a GAN, not a diffusion model", sample="no: a GAN, not a diffusion model",
                        metrics=give), **info}
    else:
        return {**_uses("torch state dict of no known network", refine="no", distill="no", sample="no",
                        metrics="no"), **info}
    gen = f"yes, as --generator (G(z) = f(80·z; σ=80)){needs}"
    return {**_uses(kind, refine=gen, distill=f"yes, as --init (the starting generator; the teacher: an EDM "
                                                f"--teacher){needs}",
                    sample=f"yes, as --teacher (sampled in one step){needs}", metrics=gen), **info}
