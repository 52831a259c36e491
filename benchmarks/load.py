"""Loading benchmark: a full-size CIFAR-10 DDPM++ teacher pickle (EDM layout, random weights) through
`teachers.load_teacher`: load time, peak memory against the file size (target < 2x), and denoiser
throughput.

    python benchmarks/load.py [--batch 64] [--iters 5] [--device cpu] [--keep DIR]

The pickle is written by our own networks and fileformats.nvpickle (NVIDIA's layout, with a placeholder
module source). Loading is measured in a fresh Python process so that the peak resident set size
(ru_maxrss) belongs to the load alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

# CIFAR-10 DDPM++ as EDM's train.py builds it (--arch=ddpmpp --cond=0, augment on): ~55.7M parameters.
DDPMPP_CIFAR10 = dict(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                      embedding_type="positional", encoder_type="standard", decoder_type="standard",
                      channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                      channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                      augment_dim=9)
# The same architecture at a tiny width (16 channels, two levels, one block per level; attention at 16x16): smoke
# checks of the benchmarks on a CPU.
SMOKE_DDPMPP = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1)


def write_pickle(path: Path) -> int:
    """An EDM snapshot dict with an `ema` record of a randomly initialised DDPM++; returns #params."""
    from fileformats import nvpickle
    from teachers.edm_loader import network_record
    from teachers.edm_precond import EDMPrecond

    net = EDMPrecond(**DDPMPP_CIFAR10).eval().requires_grad_(False)
    snapshot = {"ema": network_record(net, DDPMPP_CIFAR10), "loss_fn": None, "augment_pipe": None,
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "resolution": 32}}
    nvpickle.dump(snapshot, path)
    return sum(p.numel() for p in net.parameters())


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: VmHWM of /proc/self/status where it exists (it belongs
    to this program's memory map alone), else ru_maxrss, which Linux carries over from the parent across
    fork + exec: the child would inherit the writer's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: str, device: str, batch: int, iters: int) -> dict:
    """Runs in a fresh process: load the teacher, then time the denoiser."""
    from teachers.edm_loader import load_teacher

    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    teacher = load_teacher(path, device=device)
    load_s = time.perf_counter() - t0
    peak = peak_rss()
    rss_after = psutil.Process().memory_info().rss

    x = torch.randn(batch, *teacher.data_shape, device=device)
    sigma = torch.exp(torch.randn(batch, device=device) * 1.2 - 1.2)
    result = dict(load_s=load_s, rss_before=rss_before, peak_rss=peak, rss_after=rss_after,
                  threads=torch.get_num_threads())
    dtypes = [None] if device == "cpu" else [None, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        teacher.dtype = dtype
        with torch.inference_mode():
            teacher(x, sigma)  # warm-up
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                teacher(x, sigma)
            if device != "cpu":
                torch.cuda.synchronize()
        result[f"img_per_s_{str(dtype or torch.float32).removeprefix('torch.')}"] = batch * iters / (
            time.perf_counter() - t0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", type=Path, default=None, help="write the pickle here and keep it")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.device, args.batch, args.iters)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = (args.keep or Path(tmp)) / "ddpmpp-cifar10-random.pkl"
        t0 = time.perf_counter()
        n_params = write_pickle(path)
        write_s = time.perf_counter() - t0
        size = path.stat().st_size
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--device", args.device,
                              "--batch", str(args.batch), "--iters", str(args.iters)],
                             check=True, capture_output=True, text=True, env=dict(os.environ))
        r = json.loads(out.stdout.strip().splitlines()[-1])

    mib = 2**20
    increase = r["peak_rss"] - r["rss_before"]
    print(f"DDPM++ CIFAR-10, {n_params:,} parameters, random weights; file {size / mib:.1f} MiB "
          f"(written in {write_s:.1f} s)")
    print(f"{'load_teacher time':28s} {r['load_s']:.2f} s")
    print(f"{'RSS before load':28s} {r['rss_before'] / mib:.0f} MiB (Python + torch + refiner)")
    print(f"{'peak RSS during load':28s} {r['peak_rss'] / mib:.0f} MiB")
    print(f"{'peak increase / file size':28s} {increase / mib:.0f} MiB / {size / mib:.0f} MiB "
          f"= {increase / size:.2f}x (target < 2x)")
    print(f"{'RSS after load':28s} {r['rss_after'] / mib:.0f} MiB")
    for key, value in r.items():
        if key.startswith("img_per_s"):
            print(f"{'denoiser ' + key[10:] + ' img/s':28s} {value:.1f} (batch {args.batch}, {args.device}, "
                  f"{r['threads']} threads)")


if __name__ == "__main__":
    main()
