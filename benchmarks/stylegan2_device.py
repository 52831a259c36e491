"""StyleGAN2-ADA generator on an accelerator: golden-file agreement, float16 blocks, training speed.

    python benchmarks/stylegan2_device.py [--device cuda] [--batch 64] [--iters 20]

Prints (1) the max deviation from the golden reference images (computed on CPU by NVIDIA's code)
with TF32 convolutions off and on; (2) for the CIFAR-10 configuration (512 channels, 32x32,
num_fp16_res 4, conv_clamp 256, 10 classes) the deviation of the float16-block and bfloat16-autocast
outputs from float32, and whether gradients stay finite; (3) forward+backward time per batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gan_adapters.stylegan2 import GeneratorConfig, MappingConfig, StyleGAN2Network, SynthesisConfig
from gan_adapters.stylegan2_adapter import load_stylegan2

DATA = Path(__file__).parents[1] / "tests" / "data"


def golden(device: str) -> None:
    ref = torch.load(DATA / "sg2ada-small-uncond.ref.pt", weights_only=True)
    G = load_stylegan2(DATA / "sg2ada-small-uncond.pkl", device=device, noise_mode="const")
    default = torch.backends.cudnn.allow_tf32
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        with torch.no_grad():
            img = G(ref["z"].to(device)).cpu()
            ws = G.network.mapping(ref["z"].to(device), None).cpu()
        print(f"golden  tf32={tf32!s:5}  max|ws - ref| {float((ws - ref['ws']).abs().max()):.2e}  "
              f"max|img - ref| {float((img - ref['img_const_psi1.0']).abs().max()):.2e} "
              f"(|ref| <= {float(ref['img_const_psi1.0'].abs().max()):.1f})")
    torch.backends.cudnn.allow_tf32 = default


def cifar_generator(device: str) -> StyleGAN2Network:
    torch.manual_seed(0)
    cfg = GeneratorConfig(z_dim=512, c_dim=10, w_dim=512, img_resolution=32, img_channels=3,
                          mapping=MappingConfig(num_layers=2),
                          synthesis=SynthesisConfig(num_fp16_res=4, conv_clamp=256))
    return StyleGAN2Network(cfg).to(device)


def step(G: StyleGAN2Network, z, c, **kw) -> tuple[torch.Tensor, bool]:
    G.zero_grad(set_to_none=True)
    img = G(z, c, noise_mode="const", **kw)
    img.float().square().mean().backward()
    finite = all(torch.isfinite(p.grad).all() for p in G.parameters() if p.grad is not None)
    return img.detach().float(), finite


def timed(fn, iters: int, device: str) -> float:
    fn()
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / iters * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    dev = args.device
    print(torch.__version__, torch.cuda.get_device_name(dev))
    golden(dev)

    G = cifar_generator(dev).train()
    g = torch.Generator().manual_seed(1)
    z = torch.randn([args.batch, 512], generator=g).to(dev)
    c = torch.nn.functional.one_hot(torch.randint(10, [args.batch], generator=g), 10).float().to(dev)
    variants = {
        "fp32 (force_fp32)": lambda: step(G, z, c, force_fp32=True),
        "fp16 blocks": lambda: step(G, z, c, force_fp32=False),
        "bf16 autocast + force_fp32": lambda: _autocast(lambda: step(G, z, c, force_fp32=True)),
    }
    base, _ = variants["fp32 (force_fp32)"]()
    print(f"cifar config, batch {args.batch}, training mode, forward+backward:")
    for name, fn in variants.items():
        img, finite = fn()
        rel = float((img - base).abs().max() / base.abs().max())
        ms = timed(fn, args.iters, dev)
        print(f"  {name:28} {ms:8.2f} ms/iter   max|img - fp32|/max|fp32| {rel:.2e}   grads finite {finite}")
    print(f"  peak memory {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB")


def _autocast(fn):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return fn()


if __name__ == "__main__":
    main()
