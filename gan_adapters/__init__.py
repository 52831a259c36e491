"""Generators behind one `Generator` interface (StyleGAN2-ADA, BigGAN-deep, one-step EDM, toy MLPs)."""

from gan_adapters.base import Generator

__all__ = ["Generator"]
