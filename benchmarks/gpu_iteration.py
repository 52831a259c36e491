"""Our distillation iteration on a GPU: img/s in bf16, the share of the GPU's dense bf16 peak by the FLOP count,
the largest batch that fits in memory, and with --official the official Diff-Instruct code's fp32 iteration on
the same GPU in the same call (run by benchmarks/vs_official.py, which also times ours in fp32).

    python benchmarks/gpu_iteration.py [--batch 128] [--iters 5] [--warmup 2] [--official /tmp/diff_instruct]
        [--variants channels-last,reuse-pass,compile] [--sweep 256,512] [--profile FILE] [--no-cudnn-benchmark]
    python benchmarks/gpu_iteration.py --smoke          # CPU, tiny network: checks that the script runs
    bash benchmarks/gpu_check.sh /tmp/diff_instruct     # on a lent GPU: the CUDA tests, then this, in one call

The network is EDM's CIFAR-10 DDPM++ (55.7M parameters, random weights, built with our code; benchmarks/load.py),
unconditional; one iteration = one fake-score step + one generator step at `refiner distill`'s defaults, the
teacher in the training precision. FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one
iteration (matrix products, convolutions and attention, 2 FLOP per multiply-add, forward and backward), so the
share of the peak is what the tensor cores could do with the same arithmetic, not a profiler's utilisation.
The peak is the datasheet's dense (no sparsity) bf16 figure of the GPU (PEAK_BF16_TFLOPS) or --peak-tflops.
fp32 runs with TF32 off (as vs_official.py), so it is fp32 arithmetic.

`aten_ops_per_iter` counts the ATen operations of one default iteration (autocast's casts included): at batch 128 a
GPU waits on the host that issues them (README "Speed on a GPU").

--variants times the loop again with one change each (VARIANTS: channels-last weights, --reuse-pass, --compile)
at the same batch, --sweep the default loop at other batch sizes; --profile writes torch.profiler's table of one
default iteration's GPU kernels (by total CUDA time) to FILE.

Measured on an NVIDIA H200 (torch 2.11, CUDA 13.0; README "Speed on a GPU"): bf16 at batch 128 314 / 338 img/s
(12.1 / 13.0% of the 989.4 TFLOP/s peak, two calls), 396 at batch 256, 414 at 512 (15.9%); --reuse-pass 351;
15.5 GiB at batch 128, 718 images for 80 GiB; the official fp32 iteration 106 img/s (ours in bf16 2.95x).

Memory: the peak allocated GPU memory of one iteration (weights, Adam states, EMA and activations) at the two
--memory-batches sizes, extrapolated linearly to the largest batch that fits --memory-gib (80 by default) and
the device's own memory; allocator overhead and fragmentation are not included (keep a few % spare).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root (running from a clone without installing)

import torch  # noqa: E402
from distill_step import aten_operations, build, time_iteration  # noqa: E402  benchmarks/distill_step.py
from load import SMOKE_DDPMPP  # noqa: E402  benchmarks/load.py

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's datasheets, matched in this order
# against torch.cuda.get_device_name (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4),
                    ("H200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))


def peak_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of the GPU called `device_name`, or None if it is not in the table."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


# One change each against the default loop: the benchmark's options (read by distill_step.time_iteration), or
# channels_last (the three networks' weights in NHWC, so cuDNN needs no layout transposes). cuDNN's autotuner is
# not among them: cuDNN keeps the algorithms it chose for a shape for the rest of the process, so it is compared
# in separate processes (--no-cudnn-benchmark).
VARIANTS = {"channels-last": {"channels_last": True}, "reuse-pass": {"reuse_pass": True},
            "compile": {"compile": True}}
ARITHMETIC_CHANGES = ("reuse-pass",)  # the variants whose iteration does other arithmetic (FLOPs counted again)


def flops_per_iteration(trainer) -> int:
    """FLOPs of one iteration of `trainer` (it takes the iteration's steps): its fake-score steps and its generator
    step, as Trainer.iteration runs them (with --reuse-pass the fake step is inside the generator step)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.iteration()
    return counter.get_total_flops()


def largest_batch(points: list[tuple[int, float]], budget: float) -> int:
    """The largest batch whose memory, on the line through the two (batch, bytes) `points`, is <= `budget`."""
    (b1, m1), (b2, m2) = points
    per_image = (m2 - m1) / (b2 - b1)
    if per_image <= 0:
        raise ValueError(f"memory did not grow with the batch ({points}); measure at batches further apart")
    return max(0, math.floor((budget - (m1 - per_image * b1)) / per_image))


def timed(networks, device: torch.device, precision: str, batch: int, warmup: int, iters: int,
          options: dict | None = None):
    """(seconds per iteration, trainer, peak allocated CUDA bytes or None) of the loop at `batch` with the
    benchmark `options` (distill_step.time_iteration's, and channels_last)."""
    from teachers.edm_loader import resolve_dtype

    teacher, generator, fake = networks
    teacher.dtype = None if precision == "fp32" else resolve_dtype(precision)  # the teacher in the loop's precision
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    options = dict(options or {})
    layout = torch.channels_last if options.pop("channels_last", False) else torch.contiguous_format
    for network in networks:
        network.to(memory_format=layout)
    try:
        (seconds, _cpu_seconds), trainer = time_iteration(
            teacher, generator, fake, device, SimpleNamespace(batch=batch, warmup=warmup, iters=iters, **options),
            precision)
    finally:
        for network in networks:
            network.to(memory_format=torch.contiguous_format)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, trainer, peak


def profile_table(trainer, device: torch.device, path: str) -> None:
    """torch.profiler's table of one iteration of `trainer` (its kernels by total device time) into `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.iteration()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=sort, row_limit=40))


def run_official(args) -> dict | None:
    """The official code's fp32 iteration (and ours in fp32) through vs_official.py, one round; its output is
    printed as it comes; returns the official side's JSON line."""
    command = [sys.executable, str(HERE / "vs_official.py"), "--official", args.official, "--device", args.device,
               "--precision", "fp32", "--batch", str(args.batch), "--iters", str(args.iters), "--warmup",
               str(args.warmup), "--rounds", "1", *(["--smoke"] if args.smoke else []),
               *(["--match"] if args.match else [])]
    lines = subprocess.run(command, capture_output=True, text=True)
    print(lines.stdout, end="", flush=True)
    if lines.returncode:
        sys.exit(f"vs_official.py failed:\n{lines.stderr[-3000:]}")
    sides = [json.loads(line) for line in lines.stdout.splitlines() if line.startswith("{")]
    return next((s for s in sides if s.get("side") == "official"), None)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: the table)")
    parser.add_argument("--memory-batches", default="32,64", help="two batch sizes to measure peak memory at")
    parser.add_argument("--memory-gib", type=float, default=80.0)
    parser.add_argument("--official", metavar="PATH", help="a clone of pkulwj1994/diff_instruct (vs_official.py)")
    parser.add_argument("--match", action="store_true", help="official loop with our settings (vs_official.py)")
    parser.add_argument("--variants", default="", help=f"comma-separated, each timed too: {', '.join(VARIANTS)}")
    parser.add_argument("--sweep", default="", help="comma-separated batch sizes to time the default loop at too")
    parser.add_argument("--profile", metavar="FILE", help="write the profiler's table of one iteration to FILE")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="the loop's --no-cudnn-benchmark (cuDNN's heuristic algorithms; compare with a run "
                             "without it, in its own process)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny network on the CPU, batch 2, one iteration: checks that the script runs")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if args.smoke:
        args.device, args.batch, args.iters, args.warmup = "cpu", 2, 1, 0
    device = torch.device(args.device)
    if device.type == "cpu":
        args.precision = "fp32"  # what the loop runs on a CPU
    torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32 (as in vs_official.py); bf16 autocast is unaffected
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --smoke for the CPU check)")
    networks = build(device, 0, **(SMOKE_DDPMPP if args.smoke else {}))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    params = sum(p.numel() for p in networks[1].parameters())
    print(f"# {name}, torch {torch.__version__}; DDPM++ 32x32 with {params:,} parameters per network, "
          f"batch {args.batch}, {args.precision}, {args.warmup} warm-up + {args.iters} timed iterations", flush=True)

    base = {"no_cudnn_benchmark": args.no_cudnn_benchmark}
    seconds, trainer, peak_at_batch = timed(networks, device, args.precision, args.batch, args.warmup, args.iters,
                                            base)
    if args.profile:
        profile_table(trainer, device, args.profile)
    flops = flops_per_iteration(trainer)
    operations = aten_operations(trainer.iteration)  # the host's work: each a launch or a view (casts included)
    del trainer
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    result = {"device": name, "precision": args.precision, "batch": args.batch, "s_per_iter": round(seconds, 4),
              "img_per_s": round(args.batch / seconds, 2), "gflop_per_image": round(flops / args.batch / 1e9, 2),
              "tflop_per_s": round(flops / seconds / 1e12, 3), "aten_ops_per_iter": operations, "peak_tflops": peak,
              "percent_of_peak": None if peak is None else round(100 * flops / seconds / 1e12 / peak, 1)}
    if peak_at_batch is not None:
        result["peak_cuda_gib"] = round(peak_at_batch / 2**30, 2)
        points = []
        for b in map(int, args.memory_batches.split(",")):
            points.append((b, timed(networks, device, args.precision, b, 0, 1, base)[2]))
        total = torch.cuda.get_device_properties(device).total_memory
        result.update(memory_points_gib={b: round(m / 2**30, 3) for b, m in points},
                      largest_batch={f"{args.memory_gib:g} GiB": largest_batch(points, args.memory_gib * 2**30),
                                     f"this device ({total / 2**30:.1f} GiB)": largest_batch(points, total)})
    print(json.dumps(result), flush=True)

    def line(label: str, batch: int, seconds: float, flop: float) -> dict:
        row = {"run": label, "batch": batch, "img_per_s": round(batch / seconds, 2),
               "gflop_per_image": round(flop / batch / 1e9, 2),
               "percent_of_peak": None if peak is None else round(100 * flop / seconds / 1e12 / peak, 1)}
        print(json.dumps(row), flush=True)
        return row

    result["variants"] = []
    for variant in variants:
        seconds, trainer, _ = timed(networks, device, args.precision, args.batch, args.warmup, args.iters,
                                    {**base, **VARIANTS[variant]})
        flop = flops_per_iteration(trainer) if variant in ARITHMETIC_CHANGES else flops
        result["variants"].append(line(variant, args.batch, seconds, flop))
        del trainer
    for batch in (int(b) for b in args.sweep.split(",") if b):
        seconds = timed(networks, device, args.precision, batch, args.warmup, args.iters, base)[0]
        result["variants"].append(line("default", batch, seconds, flops * batch / args.batch))
    if args.official:
        official = run_official(args)
        if official is not None:
            result["official_fp32_img_per_s"] = round(official["img_per_s"], 3)
            result["ours_over_official"] = round(result["img_per_s"] / official["img_per_s"], 2)
            print(f"ours {args.precision} / official fp32: {result['ours_over_official']:.2f}x img/s", flush=True)
    return result


if __name__ == "__main__":
    main()
