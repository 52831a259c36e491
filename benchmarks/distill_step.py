"""Speed and memory of one distillation iteration (one fake-score step + one generator step) with a
CIFAR-10-size DDPM++ teacher (EDM's --arch=ddpmpp: SongUNet 32x32, 128 channels, mult [2,2,2], 4 blocks,
attention at 16x16; random weights, built with our code), generator and fake score copied from it.

    python benchmarks/distill_step.py [--batch 8] [--iters 3] [--warmup 1]              # CPU
    python benchmarks/distill_step.py --device cuda --batch 128 --precision bf16,fp32     # GPU
    OMP_NUM_THREADS=1 python benchmarks/distill_step.py --threads 1 [--reuse-images | --reuse-pass] [--compile]

For each precision it runs `--warmup` iterations, then times `--iters` and prints img/s (generator
images per second), seconds per iteration (wall clock, and the process's CPU time: on a shared machine
compare `cpu_s_per_iter` at one thread), peak resident memory of the process and, on CUDA, the peak
GPU memory of that precision's run; the teacher runs in the training precision (what `refiner distill`
does). Also printed: generator steps skipped for non-finite gradients (fp16 loss scaling skips its
first steps while the scale settles).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch
from load import DDPMPP_CIFAR10  # benchmarks/load.py: EDM's CIFAR-10 DDPM++ configuration


def build(device: torch.device, label_dim: int, **overrides):
    from gan_adapters.onestep import OneStepGenerator
    from refiner.jobs import trainable_copy
    from teachers.edm_loader import EDMTeacher, network_record
    from teachers.edm_precond import EDMPrecond

    torch.manual_seed(0)
    kwargs = {**DDPMPP_CIFAR10, "label_dim": label_dim, **overrides}  # overrides: e.g. load.SMOKE_DDPMPP
    network = EDMPrecond(**kwargs).eval()
    record = network_record(network, kwargs)  # (what a snapshot would be written from; shares CPU tensors)
    teacher = EDMTeacher(network.to(device), record)
    generator = OneStepGenerator.from_teacher(teacher, sigma_init=1.0).train()
    return teacher, generator, trainable_copy(teacher)


def seconds_per_call(step, warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) per call of `step` after `warmup` untimed calls
    (CUDA work synchronised at both ends)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu) / iters


def aten_operations(step) -> int:
    """The ATen operations one call of `step` dispatches (under autocast its casts too): each a kernel launch or a
    view on a GPU, each some host time everywhere."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.calls


def time_iteration(teacher, generator, fake, device: torch.device, args, precision: str = "fp32"):
    """((wall, CPU) seconds per iteration, the Trainer) of `refiner distill`'s loop at its defaults (and
    `args.reuse_images`, `args.reuse_pass`, `args.batch_gpu`, `args.recompute_norms`, `args.winograd`,
    `args.mmap_threshold`, `args.compile`, `args.no_cudnn_benchmark` where given): one `Trainer.iteration`,
    `args.warmup` untimed then `args.iters` timed, in a temporary run directory."""
    from refiner.config import TrainConfig
    from refiner.loop import Trainer
    from refiner.rundir import RunDir

    config = TrainConfig(steps=args.warmup + args.iters, batch=args.batch, precision=precision,
                         device=device.type, log_every=1, reuse_images=getattr(args, "reuse_images", False),
                         reuse_pass=getattr(args, "reuse_pass", False), batch_gpu=getattr(args, "batch_gpu", None),
                         recompute_norms=getattr(args, "recompute_norms", False),
                         winograd=getattr(args, "winograd", False),
                         mmap_threshold=getattr(args, "mmap_threshold", None),
                         compile=getattr(args, "compile", False),
                         cudnn_benchmark=not getattr(args, "no_cudnn_benchmark", False))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, generator, teacher, fake, RunDir(tmp), device, echo=lambda s: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = seconds_per_call(trainer.iteration, args.warmup,
                                   args.iters, device)
    return seconds, trainer


def iteration_speed(precision: str, args, teacher, generator, fake, device: torch.device) -> dict:
    from teachers.edm_loader import resolve_dtype

    teacher.dtype = None if precision == "fp32" else resolve_dtype(precision)
    (seconds, cpu), trainer = time_iteration(teacher, generator, fake, device, args, precision)
    result = {"device": str(device), "precision": precision, "batch": args.batch, "iters": args.iters,
              "reuse_images": args.reuse_images, "reuse_pass": args.reuse_pass,
              "batch_gpu": getattr(args, "batch_gpu", None),
              "recompute_norms": getattr(args, "recompute_norms", False),
              "winograd": getattr(args, "winograd", False), "mmap_threshold": getattr(args, "mmap_threshold", None),
              "compile": args.compile, "cudnn_benchmark": not args.no_cudnn_benchmark,
              "threads": torch.get_num_threads(),
              "s_per_iter": round(seconds, 4), "cpu_s_per_iter": round(cpu, 4),
              "img_per_s": round(args.batch / seconds, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "skipped_generator": trainer.counters.skipped_generator,
              "skipped_fake": trainer.counters.skipped_fake}
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def run(build, describe, description: str) -> None:
    """Parse the common options, build (teacher, generator, fake) with `build(device, args)` and time each
    precision; `describe(teacher, generator, fake)` gives the header line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--cond", action="store_true", help="10 classes (CIFAR-10 cond) instead of none")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--reuse-images", action="store_true", help="the loop's --reuse-images")
    parser.add_argument("--reuse-pass", action="store_true", help="the loop's --reuse-pass")
    parser.add_argument("--batch-gpu", type=int, default=None, help="the loop's --batch-gpu (images per network call)")
    parser.add_argument("--recompute-norms", action="store_true", help="the loop's --recompute-norms")
    parser.add_argument("--winograd", action="store_true", help="the loop's --winograd")
    parser.add_argument("--mmap-threshold", type=float, default=None, metavar="MIB", help="the loop's --mmap-threshold")
    parser.add_argument("--compile", action="store_true", help="the loop's --compile (compile time is in warm-up)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="the loop's --no-cudnn-benchmark (compare in separate processes: cuDNN keeps the "
                             "algorithms it chose for a shape for the rest of the process)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher, generator, fake = build(device, args)
    print(f"# {describe(teacher, generator, fake)}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    speed = {}
    for precision in args.precision.split(","):
        result = iteration_speed(precision, args, teacher, generator, fake, device)
        speed[precision] = result["img_per_s"]
        print(json.dumps(result), flush=True)
    if "fp32" in speed and len(speed) > 1:  # mixed precision against the fp32 reference, same run
        print("# img/s relative to fp32: " + ", ".join(f"{p} {v / speed['fp32']:.2f}x" for p, v in speed.items()
                                                       if p != "fp32"))


def main() -> None:
    run(lambda device, args: build(device, 10 if args.cond else 0),
        lambda t, g, f: f"DDPM++ 32x32, {sum(p.numel() for p in g.parameters()):,} parameters per network",
        __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
