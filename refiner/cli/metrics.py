"""`refiner metrics`: FID / IS / KID of an image set or a generator against a reference."""

from __future__ import annotations

import json

import click

from common.devices import resolve_device
from common.errors import UserError
from metrics.evaluate import evaluate, open_needed_reference, parse_metrics
from metrics.images import open_image_set
from refiner.cli.options import (
    BATCH,
    DEVICE,
    FINITE_FLOAT,
    SEED,
    fetch_source,
    given_options,
    resolution_option,
    sha256_option,
    threads_option,
)

DEFAULT_IMAGE_METRICS = "fid,is"
DEFAULT_GENERATOR_METRICS = "fid50k_full,is50k"


def _load_detector(source: str | None, frontend: str, device: str):
    from metrics.detector import load_detector

    return load_detector(source, frontend=frontend, device=device)


def _load_generator(source: str, device: str, options: dict):
    from gan_adapters.loader import load_generator

    return load_generator(source, device=device, **options)


def _print_human(results: dict[str, float]) -> None:
    if "fid" in results:
        click.echo(f"FID  {results['fid']:.4f}")
    if "is_mean" in results:
        click.echo(f"IS   {results['is_mean']:.4f} +- {results['is_std']:.4f}")
    if "kid" in results:
        click.echo(f"KID  {results['kid']:.6f}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", "images", type=click.Path(exists=True), default=None,
              help="Image set to measure: a folder of png/jpg, a dataset .zip, or an .npz of uint8 NHWC "
                   "images.")
@click.option("--generator", "generator", default=None,
              help="Generator to measure (pickle, checkpoint folder or URL); samples are drawn with --seed.")
@sha256_option("generator")
@click.option("--sigma-init", type=FINITE_FLOAT, default=None,
              help="σ_init of a one-step EDM generator without refiner's metadata, G(z) = D(σ_init·z; σ_init): "
                   "Diff-Instruct 1.0, SiD 2.5, DMD2 80.")
@resolution_option
@threads_option
@click.option("--ref", "ref", type=click.Path(exists=True), default=None,
              help="Reference: image folder, dataset .zip, .npz of images, or an .npz with mu and sigma "
                   "(e.g. EDM's cifar10-32x32.npz). Needed for FID and KID.")
@click.option("--metrics", "metrics", default=None,
              help="Comma-separated: fid, is, kid, optionally with a sample count as NVIDIA names them "
                   f"(fid50k_full, is50k, kid50k, fid10k). Default: {DEFAULT_IMAGE_METRICS} for --images, "
                   f"{DEFAULT_GENERATOR_METRICS} for --generator (IS left out when the detector has no "
                   "classifier).")
@click.option("--num", type=click.IntRange(min=1), default=None,
              help="Samples for metrics named without a count (default: all images; 50000 for a generator).")
@click.option("--detector", "detector_source", default=None,
              help="Inception weights: NVIDIA's inception-2015-12-05 .pt/.pkl, a pytorch-fid / "
                   "torch-fidelity .pth, or a URL (default: the standard detector).")
@sha256_option("detector")
@click.option("--frontend", type=click.Choice(["nvidia", "pytorch-fid"]), default="nvidia", show_default=True,
              help="Input pipeline: nvidia = uint8, TF1 bilinear resize, (x-128)/128 (NVIDIA, "
                   "torch-fidelity); pytorch-fid = PyTorch bilinear resize of [0,1] images.")
@click.option("--fid-method", type=click.Choice(["sqrtm", "eig"]), default="sqrtm", show_default=True,
              help="FID trace term: scipy sqrtm (NVIDIA, pytorch-fid) or eigenvalues (torch-fidelity).")
@click.option("--batch", "batch_size", type=BATCH, default=64, show_default=True,
              help="Images per detector batch.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed for generator samples, image subsets and KID subsets.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the keys fid, is_mean, is_std, kid (those computed).")
def command(images, generator, generator_sha256, sigma_init, resolution, ref, metrics, num, detector_source,
            detector_sha256, frontend, fid_method, batch_size, seed, device, as_json):
    """Measure FID / IS / KID of an image set or a generator against a reference.

    \b
    Examples:
      refiner metrics --images samples/ --ref cifar10-32x32.npz
      refiner metrics --generator network.pkl --ref cifar10-32x32.zip --metrics fid50k_full,is50k,kid50k
    """
    if (images is None) == (generator is None):
        raise UserError("give exactly one of --images (an image set) or --generator (a network to sample)")
    for flag, value in (("--sigma-init", sigma_init), ("--resolution", resolution)):
        if value is not None and generator is None:
            raise UserError(f"{flag} applies to --generator (a one-step generator), not to --images")
    spec = metrics if metrics is not None else DEFAULT_IMAGE_METRICS if images else DEFAULT_GENERATOR_METRICS
    requests = parse_metrics(spec)
    ref = open_needed_reference(requests, ref)  # before the detector and the generator are loaded
    if images is not None:
        images = open_image_set(images)
    device = resolve_device(device)
    if detector_source is not None:
        detector_source = fetch_source(detector_source, detector_sha256, "detector")
    detector = _load_detector(detector_source, frontend, device)
    if metrics is None and getattr(detector, "has_logits", True) is False:
        spec = ",".join(f"{r.name}{r.num or ''}" for r in requests if r.name != "is")
        click.echo("note: these Inception weights have no classifier, so IS is left out", err=True)
    source = images if images is not None else \
        _load_generator(fetch_source(generator, generator_sha256, "generator"), device,
                        given_options(sigma_init=sigma_init, resolution=resolution))
    results = evaluate(source, detector, spec, ref=ref, num=num,
                       batch_size=batch_size, seed=seed, fid_method=fid_method, frontend=frontend)
    if as_json:
        click.echo(json.dumps(results))
    else:
        _print_human(results)
