"""refiner: make generative models better with a pre-trained diffusion teacher (Diff-Instruct)."""

__version__ = "0.1.0"
