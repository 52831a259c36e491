"""Diffusion teachers behind one `Denoiser` interface: exact analytic teachers and clean-room EDM
networks loaded from NVIDIA pickles. Knows nothing of the training loop.

Public API: `load_teacher(path_or_url, device=None, dtype=None)` and the `Denoiser` protocol. The loader
is imported on first use, so `import teachers` stays cheap."""

from __future__ import annotations

from typing import Any

from teachers.base import Denoiser

__all__ = ["Denoiser", "load_teacher"]


def __getattr__(name: str) -> Any:  # PEP 562: import the loader (and torch.nn networks) on first use
    if name == "load_teacher":
        from teachers.edm_loader import load_teacher

        return load_teacher
    raise AttributeError(f"module 'teachers' has no attribute {name!r}")
