"""Generators behind one `Generator` interface (StyleGAN2-ADA, BigGAN-deep, one-step EDM, toy MLPs).

Public API: `load_generator(path_or_url_or_folder, device=None, **options)` and the `Generator` interface.
The loader is imported on first use, so `import gan_adapters` stays cheap."""

from __future__ import annotations

from typing import Any

from gan_adapters.base import Generator

__all__ = ["Generator", "load_generator"]


def __getattr__(name: str) -> Any:  # PEP 562: import the loaders (and every network family) on first use
    if name == "load_generator":
        from gan_adapters.loader import load_generator

        return load_generator
    raise AttributeError(f"module 'gan_adapters' has no attribute {name!r}")
