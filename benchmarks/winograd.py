"""--winograd on this machine: each 3×3 convolution of a CIFAR-10 DDPM++ forward pass (EDM's --arch=ddpmpp, random
weights) timed by oneDNN's direct convolution (F.conv2d, what torch picks) and by NNPACK's fast kernels
(torch._nnpack_spatial_convolution, what `--winograd` calls for the layers it takes), forward and input gradient
(oneDNN's convolution_backward against NNPACK's forward kernel on the adjoint weights, edm_layers._WinogradConv),
with the ratios and the largest relative difference; then the whole forward pass, and forward + backward, both ways.

    python benchmarks/winograd.py [--batch 8] [--threads 2] [--reps 5]

`--winograd` takes a layer when it has at least edm_layers.WINOGRAD_MIN_CHANNELS channels in and out and a map of at
least WINOGRAD_MIN_SIZE × WINOGRAD_MIN_SIZE; the table marks them. Measured on the 2-core AMD EPYC (Zen 1, AVX2)
this project is developed on, batch 8, 2 threads: the 3×3 layers it takes ran 1.32-1.50x faster forward (relative
difference ≤ 1.7e-5; 0.99-1.39x and 1.01-1.43x in other runs of the same script), the ones it leaves 0.33-0.78x, and
the whole forward pass 1.17-1.19x faster (4.955 → 4.148 s). Their input gradients: 1.12-1.38x (0.90x on the one
layer with 128 output channels); the whole forward + backward in train mode 19.21 → 16.97 s (1.13x; a busy host).
AVX-512 machines run oneDNN's direct convolution much faster while NNPACK stays at AVX2: measure before switching it
on there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (running from a clone)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from load import DDPMPP_CIFAR10  # noqa: E402  benchmarks/load.py: EDM's CIFAR-10 DDPM++ configuration

from teachers import edm_layers  # noqa: E402
from teachers.edm_precond import EDMPrecond  # noqa: E402


def seconds(fn, reps: int) -> float:
    fn()
    fn()  # NNPACK's workspace and oneDNN's kernels are set up by the first calls
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def layer_runs(inp: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> list[tuple[Callable, Callable]]:
    """(direct, NNPACK) for a layer's forward and for its input gradient: torch's own, and edm_layers'
    (_WinogradConv's calls: the output gradient `grad` convolved with w's adjoint)."""
    return [(lambda: F.conv2d(inp, w, padding=1), lambda: edm_layers.nnpack_conv3x3(inp, w)),
            (lambda: torch.ops.aten.convolution_backward(grad, inp, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                         1, [True, False, False])[0],
             lambda: edm_layers.nnpack_conv3x3(grad, edm_layers.adjoint(w)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.backends.nnpack.is_available():
        sys.exit("NNPACK is not available in this torch build or on this CPU (it needs AVX2): --winograd changes "
                 "nothing here")
    torch.manual_seed(0)
    net = EDMPrecond(**DDPMPP_CIFAR10).eval().requires_grad_(False)
    x, sigma = torch.randn(args.batch, 3, 32, 32), torch.full((args.batch,), 1.0)

    shapes: dict[tuple, int] = {}  # (input shape, weight shape) -> calls per forward
    conv_same = edm_layers.conv_same

    def record(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        key = (tuple(inp.shape), tuple(w.shape))
        shapes[key] = shapes.get(key, 0) + 1
        return conv_same(inp, w, b)

    edm_layers.conv_same = record
    net(x, sigma)
    edm_layers.conv_same = conv_same

    print(f"# batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'calls':>5s} {'input':>20s} {'weight':>18s} {'forward ms':>17s} {'ratio':>6s} {'input grad ms':>17s} "
          f"{'ratio':>6s} {'rel. diff':>9s}  taken")
    for (in_shape, w_shape), calls in sorted(shapes.items(), key=lambda kv: -kv[1]):
        if w_shape[-2:] != (3, 3):
            continue
        inp, w = torch.randn(in_shape), torch.randn(w_shape) / (w_shape[1] * 9) ** 0.5
        grad = torch.randn(in_shape[0], w_shape[0], *in_shape[2:])
        cells, diff = [], 0.0
        for direct_fn, fast_fn in layer_runs(inp, w, grad):
            direct, fast = seconds(direct_fn, args.reps), seconds(fast_fn, args.reps)
            ref = direct_fn()
            diff = max(diff, float((fast_fn() - ref).abs().max() / ref.abs().max()))
            cells.append(f"{direct * 1e3:8.2f} {fast * 1e3:8.2f} {direct / fast:5.2f}x")
        with edm_layers.winograd_convs():
            taken = edm_layers.winograd_takes(inp, w)
        print(f"{calls:5d} {str(in_shape):>20s} {str(w_shape):>18s} {' '.join(cells)} {diff:9.1e}  "
              f"{'yes' if taken else 'no'}")

    with torch.no_grad():
        plain = seconds(lambda: net(x, sigma), args.reps)
        with edm_layers.winograd_convs():
            fast = seconds(lambda: net(x, sigma), args.reps)
    print(f"whole forward pass: direct {plain:.3f} s, --winograd {fast:.3f} s: {plain / fast:.2f}x")
    net.train().requires_grad_(True)

    def forward_backward() -> None:
        net(x, sigma).square().mean().backward()

    plain = seconds(forward_backward, args.reps)
    with edm_layers.winograd_convs():
        fast = seconds(forward_backward, args.reps)
    print(f"whole forward + backward (train mode): direct {plain:.3f} s, --winograd {fast:.3f} s: {plain / fast:.2f}x")


if __name__ == "__main__":
    main()
