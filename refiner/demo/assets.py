"""The demo's committed assets (assets/demo/, built by refiner.demo.build through
scripts/build_demo_assets.py): a small EDM teacher and a small, deliberately under-trained StyleGAN2
generator, both trained on Fashion-MNIST (32x32, one channel), a Fashion-MNIST classifier whose penultimate
features give a domain Fréchet distance (FD) and whose softmax gives a classifier score
(metrics/classifier.py), reference statistics, and the teacher's own samples (18-step Heun sampler, 35
network calls each: made at build time, as on two CPU cores they would take longer than the whole demo).
manifest.json names every file with its sha256; the demo generator is stored in our own format
(GENERATOR_FORMAT: the original constructor kwargs and the tensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from fileformats.atomic import atomic_open
from fileformats.sources import file_sha256
from gan_adapters.stylegan2 import GeneratorConfig, StyleGAN2Network
from gan_adapters.stylegan2_adapter import Snapshot, StyleGAN2Generator, StyleGAN2Options
from metrics.classifier import DomainClassifier
from teachers.edm_loader import EDMTeacher, network_record
from teachers.edm_precond import EDMPrecond

DEFAULT_ASSETS = Path(__file__).resolve().parent.parent.parent / "assets" / "demo"
ASSETS_FORMAT = "refiner-demo-assets/1"
GENERATOR_FORMAT = "refiner-demo-generator/1"
EVAL_SEED = 1  # latents of the metric samples (the grids use seed 0, as every image job)


@dataclass
class DemoAssets:
    """Everything the demo loads from assets/demo (manifest.json says what each file is)."""

    path: Path
    manifest: dict[str, Any]
    teacher: EDMTeacher
    classifier: DomainClassifier
    stats: dict[str, np.ndarray]  # test_mu / test_cov (reference half of the test set), train_mu / train_cov
    teacher_samples: torch.Tensor  # uint8 [N, 1, 32, 32]
    generator_state: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]  # fixed inputs and the outputs the networks gave at build time

    def generator(self, device: torch.device | str = "cpu") -> StyleGAN2Generator:
        """A fresh trainable copy of the demo GAN behind the Generator interface."""
        return demo_generator(self.manifest["networks"]["generator"]["config"], self.generator_state, device)


def _load_tensors(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or git-lfs pointer file: say which and what to do
        raise UserError(f"cannot read demo asset {path} ({type(e).__name__}: {e}); restore it from the "
                        "repository or rebuild with scripts/build_demo_assets.py") from None


def load_assets(path: str | Path | None = None, device: torch.device | str = "cpu", check: bool = True
                ) -> DemoAssets:
    """Load and (with `check`) verify the sha256 of every asset file against the manifest."""
    path = Path(path) if path is not None else DEFAULT_ASSETS
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"no demo assets in {path} (manifest.json missing); give --assets DIR or rebuild "
                        "them with scripts/build_demo_assets.py")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != ASSETS_FORMAT:
        raise UserError(f"{manifest_path}: format {manifest.get('format')!r}, expected {ASSETS_FORMAT!r}; "
                        "rebuild the assets with this version's scripts/build_demo_assets.py")
    files = manifest["files"]
    if check:
        for name, digest in files.items():
            if not (path / name).is_file() or file_sha256(path / name) != digest:
                raise UserError(f"demo asset {path / name} is missing or differs from the manifest (sha256); "
                                "restore it from the repository or rebuild with scripts/build_demo_assets.py")
    nets = manifest["networks"]
    teacher_net = EDMPrecond(**nets["teacher"]["init_kwargs"])
    teacher_state = _load_tensors(path / nets["teacher"]["file"])
    teacher_net.load_state_dict({k: v.float() for k, v in teacher_state.items()})
    record = network_record(teacher_net.eval(), nets["teacher"]["init_kwargs"])
    teacher = EDMTeacher(teacher_net.to(device), record)
    classifier = DomainClassifier.from_state(nets["classifier"]["config"],
                                             _load_tensors(path / nets["classifier"]["file"])).to(device)
    stats = {k: v.numpy() for k, v in _load_tensors(path / manifest["stats"]["file"]).items()}
    samples = _load_tensors(path / manifest["teacher_samples"]["file"])["images"]
    return DemoAssets(path, manifest, teacher, classifier, stats, samples,
                      _load_tensors(path / nets["generator"]["file"]),
                      _load_tensors(path / manifest["reference"]["file"]))


def demo_generator(config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
                   ) -> StyleGAN2Generator:
    """The demo's StyleGAN2 (our format: config = the original constructor kwargs, state = its tensors)."""
    network = StyleGAN2Network(GeneratorConfig.from_init_kwargs((), config))
    network.load_state_dict({k: v.float() for k, v in state.items()})
    return StyleGAN2Generator(network.eval(), Snapshot({}, "demo generator"), StyleGAN2Options()).to(device)


def save_demo_generator(generator: nn.Module, path: Path) -> None:
    """Write a demo StyleGAN2 in our format (torch.load(weights_only=True) reads it)."""
    network = generator.network
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    with atomic_open(path) as f:
        torch.save({"format": GENERATOR_FORMAT, "config": network.cfg.to_init_kwargs(), "state": state}, f)
