"""A small domain classifier for one-channel 32x32 images (the demo's Fashion-MNIST), and the two scores
built on it, the domain analogues of FID and IS:

- domain Fréchet distance (FD): the Fréchet distance between Gaussians fitted to the classifier's
  penultimate features (global average pool of the last convolution, after ReLU, like Inception's pool3)
  of two image sets (Heusel et al. 2017, with the classifier in place of Inception);
- classifier score: exp(E_x KL(p(y|x) || p(y))) from its softmax (Salimans et al. 2016, same splits).

Inception on 28-px grey images is slow on a CPU and weakly informative; a classifier trained on the
domain sees what matters there. Images go in as uint8 (what the metric pipeline quantises every
generator output to), so real and generated images take the same path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metrics.stats import IS_SPLITS, FeatureStats, fid, inception_score


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    resolution: int = 32
    channels: Sequence[int] = field(default_factory=lambda: [32, 64, 128, 128])  # one 3x3 conv per stage
    num_classes: int = 10


class DomainClassifier(nn.Module):
    """conv3x3-ReLU stages, 2x average pooling between stages, global average pool -> features
    [N, channels[-1]] -> linear -> logits [N, num_classes]. Input: float images in [-1, 1]."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        widths = [config.in_channels, *config.channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.fc = nn.Linear(widths[-1], config.num_classes)
        self.feature_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < len(self.convs) - 1:
                x = F.avg_pool2d(x, 2)
        features = x.mean(dim=(2, 3))
        return features, self.fc(features)

    def config_json(self) -> dict:
        return asdict(self.config) | {"channels": list(self.config.channels)}

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> DomainClassifier:
        net = cls(ClassifierConfig(**config))
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return net.eval().requires_grad_(False)


def uint8_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [-1, 1], the inverse of the (x·127.5 + 128) quantisation."""
    return images.to(torch.float32) / 127.5 - 1


@dataclass
class DomainFeatures:
    """Streaming feature statistics and all logits of one image set."""

    stats: FeatureStats
    logits: list[np.ndarray] = field(default_factory=list)

    @property
    def all_logits(self) -> np.ndarray:
        return np.concatenate(self.logits)


@torch.no_grad()
def embed(classifier: DomainClassifier, batches: Iterable[torch.Tensor]) -> DomainFeatures:
    """Features and logits of uint8 image batches [B, C, H, W] (RGB batches of grey images are reduced
    to their first channel)."""
    device = next(classifier.parameters()).device
    out = DomainFeatures(FeatureStats(classifier.feature_dim))
    channels = classifier.config.in_channels
    for batch in batches:
        x = uint8_to_input(batch[:, :channels].to(device))
        features, logits = classifier(x)
        out.stats.update(features)
        out.logits.append(logits.float().cpu().numpy())
    return out


def domain_scores(features: DomainFeatures, ref_mu: np.ndarray, ref_cov: np.ndarray, num_splits: int = IS_SPLITS
                  ) -> dict[str, float]:
    """{'fd': domain Fréchet distance to the reference Gaussian, 'cs': classifier score (mean of the
    splits)}."""
    s = features.stats
    return {"fd": fid(s.mean, s.cov, ref_mu, ref_cov),
            "cs": inception_score(features.all_logits, num_splits=num_splits)[0]}


def class_shares(features: DomainFeatures) -> np.ndarray:
    """The fraction of the images that the classifier assigns to each class (argmax of the logits)."""
    logits = features.all_logits
    return np.bincount(logits.argmax(1), minlength=logits.shape[1]) / len(logits)
