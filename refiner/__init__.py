"""refiner: make generative models better with a pre-trained diffusion teacher (Diff-Instruct and the other
score-distillation divergences).

Public API: `refiner.train(generator, teacher, out, **options)` (refiner/api.py), imported on first use so
`import refiner` (and the CLI's start-up) stays cheap."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["train"]


def __getattr__(name: str) -> Any:  # PEP 562
    if name == "train":
        from refiner.api import train

        return train
    raise AttributeError(f"module 'refiner' has no attribute {name!r}")
