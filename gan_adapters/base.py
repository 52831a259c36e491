"""The `Generator` interface (docs/design.md §3).

Conventions: samples are float tensors in [-1, 1] (images NCHW), labels are one-hot float tensors
[N, c_dim] or None when c_dim == 0. Calling the generator is differentiable in its trainable
parameters; the refinement loop only ever sees this interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch

from common.errors import UserError


@runtime_checkable
class Generator(Protocol):
    z_dim: int
    c_dim: int  # 0 = unconditional
    data_shape: tuple[int, ...]  # shape of one sample, e.g. (3, 32, 32) or (2,)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latents from the family's own prior (StyleGAN2: N(0, I); BigGAN: truncated normal)."""

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """n one-hot labels drawn uniformly over the classes, or None for unconditional models."""

    def __call__(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor: ...

    def save(self, path: str | os.PathLike) -> None:
        """Write the generator in its family's native format."""


def rng_device(generator: torch.Generator | None) -> torch.device:
    """Where a torch.Generator draws (CPU without one)."""
    return generator.device if generator is not None else torch.device("cpu")


def standard_normal(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) of `shape`, drawn on the generator's device."""
    return torch.randn(shape, generator=generator, device=rng_device(generator))


def uniform_one_hot(n: int, c_dim: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor | None:
    """n one-hot rows with classes drawn uniformly (what NVIDIA's metric code does), or None if c_dim == 0."""
    if c_dim == 0:
        return None
    device = rng_device(generator) if device is None else device
    idx = torch.randint(c_dim, (n,), generator=generator, device=device)
    return torch.nn.functional.one_hot(idx, c_dim).float()


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose of a seeded command, independent of its other purposes' streams:
    the first 8 bytes of sha256("seed/purpose")."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded_global_rng(seed: int, purpose: str, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with torch's global generators (CPU, and `device` if CUDA) seeded for `purpose`, and
    restore their state afterwards: what a network draws itself (StyleGAN2's per-pixel noise, dropout) is
    then reproducible, and the caller's random stream does not move."""
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derived_seed(seed, purpose))
        yield


# The loaders' options: how the command line names each, and the generators that take it.
_STYLEGAN = "StyleGAN2-ADA and StyleGAN3 pickles"
GENERATOR_OPTIONS = {
    "noise_mode": ("--noise-mode", _STYLEGAN), "trainable": ("--trainable", _STYLEGAN),
    "truncation_psi": ("truncation_psi", _STYLEGAN), "truncation_cutoff": ("truncation_cutoff", _STYLEGAN),
    "force_fp32": ("force_fp32", _STYLEGAN), "truncation": ("--truncation", "BigGAN-deep folders"),
    "sigma_init": ("--sigma-init", "one-step generators (EDM snapshots, DMD2 and consistency-model state dicts)"),
    "resolution": ("--resolution", "consistency-model state dicts"),
}


def refused_options(name: str, kind: str, unknown: Iterable[str]) -> UserError:
    """The error for options that generator `name`, a `kind`, does not take: each named as the command line names
    it, with the generators that do take it."""
    parts = [f"{flag} applies to {takers} only"
             for flag, takers in (GENERATOR_OPTIONS.get(k, (k, "other generators")) for k in sorted(unknown))]
    return UserError(f"{name} is {kind}; " + "; ".join(parts))
