"""Inception features, FID / IS / KID, reference statistics and before/after reports.
Knows nothing of the training loop.

Public API: `compute_metrics(source, detector, metrics, ref=...)` (= metrics.evaluate.evaluate) and
`load_detector(path_or_url=None)`, imported on first use so `import metrics` stays cheap."""

from __future__ import annotations

from typing import Any

__all__ = ["compute_metrics", "load_detector"]


def __getattr__(name: str) -> Any:  # PEP 562
    if name == "compute_metrics":  # not `evaluate`: that name is the submodule metrics.evaluate
        from metrics.evaluate import evaluate

        return evaluate
    if name == "load_detector":
        from metrics.detector import load_detector

        return load_detector
    raise AttributeError(f"module 'metrics' has no attribute {name!r}")
