"""Diffusion teachers behind one `Denoiser` interface: exact analytic teachers and clean-room EDM
networks loaded from NVIDIA pickles. Knows nothing of the training loop."""

from teachers.base import Denoiser

__all__ = ["Denoiser"]
