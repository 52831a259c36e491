"""Stand-ins for the metric tests: a tiny detector (fixed random projection) and a tiny duck-typed
generator, so the tests need neither Inception weights nor gan_adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

DIM, CLASSES = 16, 10


class StandInDetector(torch.nn.Module):
    """uint8 [N, 3, H, W] -> 4x4 average pool (48 values) -> fixed random projection: pool3 [N, 16], logits
    [N, 10]. Counts its calls and keeps its inputs."""

    def __init__(self, seed: int = 0, frontend: str = "nvidia", logits: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(48, DIM, generator=g))
        self.register_buffer("head", torch.randn(DIM, CLASSES, generator=g))
        self.frontend, self.with_logits = frontend, logits
        self.calls, self.inputs = 0, []

    @property
    def has_logits(self) -> bool:
        return self.with_logits

    @property
    def feature_dim(self) -> int:
        return DIM

    def forward(self, images: torch.Tensor) -> dict:
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
        self.calls += 1
        self.inputs.append(images.clone())
        x = F.adaptive_avg_pool2d(images.float() / 127.5 - 1, 4).flatten(1)
        feats = torch.tanh(x @ self.proj / 4)
        return {"pool3": feats, "logits": 3 * feats @ self.head if self.with_logits else None}


class TinyGenerator:
    """The Generator interface, duck-typed: z [N, 4] ~ N(0, I), one-hot labels over 3 classes, images
    [N, 3, 8, 8] in [-1, 1] from a fixed random linear map; `shift` moves the output distribution."""

    z_dim, c_dim = 4, 3

    def __init__(self, shift: float = 0.0, channels: int = 3):
        g = torch.Generator().manual_seed(1)
        self.weight = torch.randn(self.z_dim + self.c_dim, channels * 64, generator=g)
        self.shift, self.channels = shift, channels
        self.label_calls = 0

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=generator)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        self.label_calls += 1
        idx = torch.randint(self.c_dim, (n,), generator=generator)
        return F.one_hot(idx, self.c_dim).float()

    def __call__(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([z, c], 1) @ self.weight
        return torch.tanh(x / 3 + self.shift).reshape(-1, self.channels, 8, 8)


def random_images(n: int, seed: int, size: int = 8, offset: int = 0) -> np.ndarray:
    """n uint8 RGB images [n, size, size, 3] with smooth random content (plus `offset` brightness)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 200, size=(n, 2, 2, 3))
    x = low.repeat(size // 2, axis=1).repeat(size // 2, axis=2) + rng.uniform(0, 55, size=(n, size, size, 3))
    return np.clip(x + offset, 0, 255).astype(np.uint8)


def write_folder(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        PIL.Image.fromarray(img).save(path / f"img{i:04d}.png")
    return path
