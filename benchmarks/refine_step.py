"""Speed and memory of one refinement iteration (one fake-score step + one generator step) with a
CIFAR-10-size StyleGAN2-ADA generator (train.py --cfg=cifar: 512 channels at every resolution, 2 mapping
layers; fp32 blocks, as on CPU) and a CIFAR-10-size DDPM++ teacher (benchmarks/load.py's configuration),
the fake score copied from the teacher. Random weights, built with our code.

    python benchmarks/refine_step.py [--batch 8] [--iters 3] [--warmup 1]            # CPU
    python benchmarks/refine_step.py --device cuda --batch 64 --precision bf16,fp32   # GPU
"""

from __future__ import annotations

import torch
from distill_step import run  # benchmarks/distill_step.py: options, timing of fake step + generator step
from load import DDPMPP_CIFAR10

CIFAR_SG2 = dict(z_dim=512, w_dim=512, c_dim=0, img_resolution=32, img_channels=3,
                 mapping_kwargs=dict(num_layers=2),
                 synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=256))


def build(device: torch.device, label_dim: int = 0):
    from gan_adapters.stylegan2 import GeneratorConfig, StyleGAN2Network
    from gan_adapters.stylegan2_adapter import Snapshot, StyleGAN2Generator, StyleGAN2Options
    from refiner.jobs import trainable_copy
    from teachers.edm_loader import EDMTeacher
    from teachers.edm_precond import EDMPrecond

    torch.manual_seed(0)
    network = StyleGAN2Network(GeneratorConfig.from_init_kwargs((), {**CIFAR_SG2, "c_dim": label_dim}))
    generator = StyleGAN2Generator(network, Snapshot({}, "benchmark"), StyleGAN2Options()).to(device).train()
    teacher = EDMTeacher(EDMPrecond(**{**DDPMPP_CIFAR10, "label_dim": label_dim}).eval().to(device))
    return teacher, generator, trainable_copy(teacher)


def main() -> None:
    run(lambda device, args: build(device, 10 if args.cond else 0),
        lambda t, g, f: f"StyleGAN2-ADA CIFAR ({sum(p.numel() for p in g.parameters()):,} parameters) + DDPM++ "
                        f"teacher/fake ({sum(p.numel() for p in f.parameters()):,} each)",
        __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
