"""One distillation iteration of the official Diff-Instruct code against ours, same teacher, same batch, same
precision, same threads or GPU; each side in a fresh process, interleaved (official, ours, official, ours).

    git clone https://github.com/pkulwj1994/diff_instruct /tmp/diff_instruct     # never vendored
    python benchmarks/vs_official.py --official /tmp/diff_instruct [--teacher edm-cifar10-32x32-uncond-vp.pkl]
        [--batch 8] [--threads 2] [--iters 2] [--warmup 1] [--rounds 2] [--match] [--reuse-images | --reuse-pass]
        [--batch-gpu N] [--recompute-norms] [--winograd] [--mmap-threshold MIB] [--device cuda --precision bf16]
        [--model-channels C] [--count-ops]

Without --teacher the official code builds a random CIFAR-10 DDPM++ teacher (EDM's --arch=ddpmpp, dropout
0.13) and pickles it with its own persistence, so both sides read the same NVIDIA-written file.

What one iteration is on each side (printed with the results):
- official (di_training_loop.py + DI_EDMLoss, run as its loop body does, single process, no DDP wrapper):
  fake step = G forward without gradients, AugmentPipe (p = 0.12, di_train.py's settings) on the fake
  images, fake forward+backward in train mode (dropout on); generator step = G forward+backward, teacher and
  fake forward in train mode with shared dropout masks, no augmentation; nan_to_num on both gradients; EMA.
  On a CPU the code's `torch.cuda.get/set_rng_state` is pointed at the CPU generator (the only patch). On a
  GPU, cuDNN's autotuner is on, as the loop sets it.
- ours (refiner.loop.Trainer, `refiner distill` defaults, EDM log-normal σ): the same network calls, with
  the teacher and the fake score in eval mode (no dropout) and no augmentation.
- `--match` runs the official loop with our settings (dropout probabilities set to 0, augmentation off),
  so both sides do the same work.

Both sides run with TF32 off (the official loop's setting), so fp32 is fp32 on either. Each side prints one JSON
line; the summary gives mean s/iter (wall and CPU process time), img/s and peak RSS
(VmHWM) per side, peak GPU memory on CUDA, and the ratio ours / official of img/s.

Measured (random CIFAR-10 DDPM++, batch 8, fp32, --threads 1 --iters 1 --warmup 1, a shared two-core machine, so
CPU seconds compare): official 96.1 CPU s/iter, 3838 MB; ours 94.7 CPU s/iter, 3627 MB. At the default 2 threads on
the idle machine: ours with --reuse-images 1.15x img/s at 0.94x the peak RSS; with --reuse-pass 1.30x at 1.16x
(official 50.4 s/iter, 3934 MB; ours 38.8 s/iter, 4564 MB); with --reuse-pass --batch-gpu 4 1.23x at 1.09x (official
48.9 s/iter, 3831 MB; ours 39.8 s/iter, 4185 MB); with --reuse-pass --recompute-norms --winograd --mmap-threshold 8,
two rounds: 1.31x img/s at 0.87x the peak RSS (official 49.06 / 49.95 s/iter, 3892 / 3846 MB; ours 36.80 / 38.79
s/iter, 3365 / 3376 MB).

The host's work: `--model-channels 4 --batch 1 --threads 1 --iters 10 --warmup 3 --count-ops --match` builds the
same layers at width 4, where the arithmetic is negligible: official 0.360 s/iter and 19,034 ATen operations, ours
0.281 s/iter and 7,021 (1.28x).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root (running from a clone without installing)

import torch  # noqa: E402
from distill_step import aten_operations, seconds_per_call, time_iteration  # noqa: E402  benchmarks/distill_step.py
from load import DDPMPP_CIFAR10, SMOKE_DDPMPP  # noqa: E402  benchmarks/load.py: EDM's CIFAR-10 DDPM++, tiny

OFFICIAL_AUGMENT = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def peak_rss_mb() -> float:
    """VmHWM: the process's peak resident set size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _import_official(path: str) -> None:
    if not (Path(path) / "training" / "di_loss.py").is_file():
        sys.exit(f"--official {path}: not a clone of pkulwj1994/diff_instruct (no training/di_loss.py); "
                 f"get it with: git clone https://github.com/pkulwj1994/diff_instruct {path}")
    sys.path.insert(0, str(Path(path).resolve()))


def make_teacher(args) -> None:
    """Build a random DDPM++ with the official code and pickle it with its persistence."""
    _import_official(args.official)
    from training.networks import EDMPrecond

    torch.manual_seed(0)
    kwargs = {**DDPMPP_CIFAR10, "label_dim": args.classes}
    if args.smoke:  # a tiny network, to check that both sides run
        kwargs.update(SMOKE_DDPMPP)
    if args.model_channels:  # the same layers at another width
        kwargs["model_channels"] = args.model_channels
    net = EDMPrecond(**kwargs).eval().requires_grad_(False)
    with open(args.teacher, "wb") as f:
        pickle.dump({"ema": net}, f)


def run_official(args, device: torch.device) -> dict:
    _import_official(args.official)
    from training.augment import AugmentPipe
    from training.di_loss import DI_EDMLoss

    if device.type == "cpu":  # DI_EDMLoss.gloss shares dropout masks through the CUDA generator's state
        torch.cuda.get_rng_state = torch.get_rng_state
        torch.cuda.set_rng_state = torch.set_rng_state
    torch.backends.cudnn.benchmark = True  # di_training_loop.py's cudnn_benchmark default (di_train.py --bench)
    with open(args.teacher, "rb") as f:
        net = pickle.load(f)["ema"].to(device).eval().requires_grad_(False)
    if args.match:
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    fake, gen = copy.deepcopy(net).train().requires_grad_(True), copy.deepcopy(net).train().requires_grad_(True)
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-5, betas=(0.0, 0.999), eps=1e-8)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-5, betas=(0.0, 0.999), eps=1e-8)
    loss_fn = DI_EDMLoss()
    augment = None if args.match else AugmentPipe(**OFFICIAL_AUGMENT)
    b, sigma_init = args.batch, 1.0
    shape = (b, net.img_channels, net.img_resolution, net.img_resolution)
    labels = torch.zeros(b, net.label_dim, device=device)
    if net.label_dim:
        labels[torch.arange(b), torch.randint(net.label_dim, (b,))] = 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    nimg = 0

    def generate(model: torch.nn.Module) -> torch.Tensor:
        z = sigma_init * torch.randn(shape, device=device)
        return model(z, torch.full((b, 1, 1, 1), sigma_init, device=device), labels,
                     augment_labels=torch.zeros(b, 9, device=device))

    def step() -> None:
        nonlocal nimg
        opt_f.zero_grad(set_to_none=True)  # fake step (di_training_loop.py)
        with torch.no_grad(), autocast:
            gen.eval()
            images = generate(gen)
            gen.train()
        with autocast:
            loss = loss_fn(net=fake, images=images.float(), labels=labels, augment_pipe=augment)
        loss.float().sum().mul(1.0 / b).backward()
        for p in fake.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt_f.step()
        opt_g.zero_grad(set_to_none=True)  # generator step
        with autocast:
            images = generate(gen)
            fake.eval()
            loss = loss_fn.gloss(Sd=net, Sg=fake, images=images.float(), labels=labels, augment_pipe=None)
            fake.train()
        loss.float().sum([1, 2, 3]).sum().mul(1.0 / b).backward()
        for p in gen.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt_g.step()
        beta = 0.5 ** (b / max(min(500e3, nimg * 0.05), 1e-8))  # EMA as the official loop
        for p_ema, p in zip(ema.parameters(), gen.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        nimg += b

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = dict(zip(("seconds", "cpu_seconds"), seconds_per_call(step, args.warmup, args.iters, device)))
    return {**result, **count_ops(step, args)}


def run_ours(args, device: torch.device) -> dict:
    from gan_adapters.onestep import OneStepGenerator
    from refiner.jobs import trainable_copy
    from teachers.edm_loader import load_teacher

    teacher = load_teacher(args.teacher, device=device, dtype=None if args.precision == "fp32" else args.precision)
    generator = OneStepGenerator.from_teacher(teacher, sigma_init=1.0).train()
    fake = trainable_copy(teacher)
    seconds, trainer = time_iteration(teacher, generator, fake, device, args, args.precision)
    return {**dict(zip(("seconds", "cpu_seconds"), seconds)), **count_ops(trainer.iteration, args)}


def count_ops(step, args) -> dict:
    """With --count-ops: {'aten_ops': the ATen operations of one more call of `step`}, else {}."""
    return {"aten_ops": aten_operations(step)} if args.count_ops else {}


def side(args) -> None:
    """One side, in this (fresh) process: prints one JSON line."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    # fp32 means fp32 on both sides, as di_training_loop.py sets it (torch's default runs cuDNN's convolutions in
    # TF32 on Ampere and newer GPUs)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    result = (run_official if args.side == "official" else run_ours)(args, device)
    result.update(side=args.side, s_per_iter=result.pop("seconds"), cpu_s_per_iter=result.pop("cpu_seconds"),
                  peak_rss_mb=round(peak_rss_mb(), 1))
    result["img_per_s"] = args.batch / result["s_per_iter"]
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--official", required=True, help="path of a clone of pkulwj1994/diff_instruct")
    parser.add_argument("--teacher", help="EDM teacher pickle (default: a random DDPM++ built by the official code)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="official/ours pairs, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--classes", type=int, default=0, help="label_dim of the built teacher (10 = CIFAR cond)")
    parser.add_argument("--smoke", action="store_true", help="build a tiny teacher instead (checks that both run)")
    parser.add_argument("--model-channels", type=int, default=None, metavar="C",
                        help="build the teacher at this width (128 in CIFAR-10's DDPM++): the same layers and so the "
                             "same operations, about (C/128)^2 of the arithmetic; with C = 4 and --batch 1 an "
                             "iteration's time is the host's (Python, dispatch, autograd), what bounds a GPU at "
                             "small batches")
    parser.add_argument("--match", action="store_true", help="run the official loop with our settings")
    parser.add_argument("--reuse-images", action="store_true",
                        help="our side with --reuse-images (8 network passes per iteration instead of 9)")
    parser.add_argument("--reuse-pass", action="store_true",
                        help="our side with --reuse-pass (7 network passes per iteration instead of 9)")
    parser.add_argument("--batch-gpu", type=int, default=None,
                        help="our side with --batch-gpu N (the batch in chunks of N, gradients summed: less memory)")
    parser.add_argument("--recompute-norms", action="store_true",
                        help="our side with --recompute-norms (GroupNorm + SiLU outputs recomputed in the backward)")
    parser.add_argument("--winograd", action="store_true",
                        help="our side with --winograd (large 3x3 convolutions by NNPACK's Winograd kernels)")
    parser.add_argument("--mmap-threshold", type=float, default=None, metavar="MIB",
                        help="our side with --mmap-threshold MIB (CPU tensors of at least MIB MiB mapped, not from the "
                             "heap)")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count the ATen operations of one more iteration on each side (after the timing)")
    parser.add_argument("--side", choices=["official", "ours", "make-teacher"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "make-teacher":
        return make_teacher(args)
    if args.side:
        return side(args)

    with tempfile.TemporaryDirectory() as tmp:
        forwarded = [a for a in sys.argv[1:]]
        if args.teacher is None:
            args.teacher = str(Path(tmp) / "ddpmpp-random.pkl")
            forwarded += ["--teacher", args.teacher]
            subprocess.run([sys.executable, __file__, *forwarded, "--side", "make-teacher"], check=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        results: dict[str, list[dict]] = {"official": [], "ours": []}
        print(f"# batch {args.batch}, {args.threads} threads, {args.device} {args.precision}, "
              f"{args.warmup} warm-up + {args.iters} timed iterations per process, {args.rounds} rounds"
              + (f", teacher width {args.model_channels} (--model-channels)" if args.model_channels else "")
              + (", --match (official loop with our settings)" if args.match else "")
              + (", ours with --reuse-images (8 network passes, official 9)" if args.reuse_images else "")
              + (", ours with --reuse-pass (7 network passes, official 9)" if args.reuse_pass else "")
              + (f", ours in chunks of {args.batch_gpu} (--batch-gpu)" if args.batch_gpu else "")
              + (", ours with --recompute-norms" if args.recompute_norms else "")
              + (", ours with --winograd" if args.winograd else "")
              + (f", ours with --mmap-threshold {args.mmap_threshold}" if args.mmap_threshold else ""), flush=True)
        for _ in range(args.rounds):
            for name in ("official", "ours"):
                out = subprocess.run([sys.executable, __file__, *forwarded, "--side", name], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{name} side failed:\n{out.stderr[-3000:]}")
                line = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(line), flush=True)
                results[name].append(line)
    summary = {}
    for name, runs in results.items():
        summary[name] = {"s_per_iter": statistics.mean(r["s_per_iter"] for r in runs),
                         "cpu_s_per_iter": statistics.mean(r["cpu_s_per_iter"] for r in runs),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
        summary[name]["img_per_s"] = args.batch / summary[name]["s_per_iter"]
        for key in ("peak_cuda_mb", "aten_ops"):
            if key in runs[0]:
                summary[name][key] = max(r[key] for r in runs)
    print(f"\n{'':10s} {'s/iter':>9s} {'CPU s/iter':>11s} {'img/s':>8s} {'peak RSS MB':>12s}")
    for name, s in summary.items():
        print(f"{name:10s} {s['s_per_iter']:9.3f} {s['cpu_s_per_iter']:11.3f} {s['img_per_s']:8.3f} "
              f"{s['peak_rss_mb']:12.0f}"
              + (f"   peak GPU {s['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in s else "")
              + (f"   {s['aten_ops']} ATen operations per iteration" if "aten_ops" in s else ""))
    ratio = summary["ours"]["img_per_s"] / summary["official"]["img_per_s"]
    cpu_ratio = summary["official"]["cpu_s_per_iter"] / summary["ours"]["cpu_s_per_iter"]
    rss = summary["ours"]["peak_rss_mb"] / summary["official"]["peak_rss_mb"]
    print(f"ours / official: {ratio:.2f}x img/s, {cpu_ratio:.2f}x img per CPU second, {rss:.2f}x peak RSS"
          + (f", {summary['ours']['aten_ops'] / summary['official']['aten_ops']:.2f}x the ATen operations"
             if args.count_ops else ""))


if __name__ == "__main__":
    main()
