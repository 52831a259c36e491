"""Write tests/data/sg2ada-arch.ref.pt: reference outputs of NVIDIA's StyleGAN2-ADA generator for small
configurations the golden snapshot does not cover ('orig' and 'resnet' architectures, labels with a
custom embedding, conv_clamp, float16 blocks, a 3-tap filter, no noise inputs, w_avg tracking).

It needs a checkout of NVlabs/stylegan2-ada-pytorch (its code is imported from there, never copied):

    python scripts/make_stylegan2_arch_ref.py --nvidia /path/to/stylegan2-ada-pytorch

The file holds, per case: `init_kwargs` (JSON), the generator's `state_dict` (random weights), the
inputs `z`, `c` and the outputs named in CALLS, computed on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

CASES = {
    "orig_uncond": dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3,
                        mapping_kwargs=dict(num_layers=2),
                        synthesis_kwargs=dict(channel_base=64, channel_max=8, architecture="orig")),
    "resnet_cond_clamp": dict(z_dim=8, c_dim=5, w_dim=8, img_resolution=16, img_channels=3,
                              mapping_kwargs=dict(num_layers=3, embed_features=6, layer_features=12),
                              synthesis_kwargs=dict(channel_base=64, channel_max=8, architecture="resnet",
                                                    conv_clamp=0.5)),
    "skip_cond_fp16": dict(z_dim=8, c_dim=5, w_dim=8, img_resolution=16, img_channels=3,
                           mapping_kwargs=dict(num_layers=2),
                           synthesis_kwargs=dict(channel_base=64, channel_max=8, num_fp16_res=2,
                                                 conv_clamp=256)),
    "resnet_fp16_filter3_nonoise": dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=32, img_channels=1,
                                        mapping_kwargs=dict(num_layers=2),
                                        synthesis_kwargs=dict(channel_base=128, channel_max=8,
                                                              architecture="resnet", num_fp16_res=3,
                                                              conv_clamp=1.0, resample_filter=[1, 2, 1],
                                                              use_noise=False)),
}

# output name -> forward kwargs (eval mode)
CALLS = {
    "img_const_fp32": dict(noise_mode="const", force_fp32=True),
    "img_none_psi0.5_cutoff3_fp32": dict(noise_mode="none", truncation_psi=0.5, truncation_cutoff=3,
                                         force_fp32=True),
    "img_const_default": dict(noise_mode="const"),  # float16 blocks where the config has them
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvidia", required=True, help="checkout of NVlabs/stylegan2-ada-pytorch")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "tests/data/sg2ada-arch.ref.pt"))
    args = parser.parse_args()
    sys.path.insert(0, args.nvidia)
    from training.networks import Generator  # NVIDIA's code, run from their checkout

    out = {}
    for i, (name, kwargs) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        G = Generator(**kwargs).eval().requires_grad_(False)
        for key, t in G.state_dict().items():  # non-trivial values everywhere but the filters
            if not key.endswith("resample_filter"):
                t.add_(torch.randn_like(t) * 0.2)
        z = torch.randn([3, kwargs["z_dim"]])
        c = torch.nn.functional.one_hot(torch.tensor([0, 2, 4]), kwargs["c_dim"]).float() \
            if kwargs["c_dim"] else torch.zeros([3, 0])
        case = {"init_kwargs": json.dumps(kwargs), "z": z, "c": c,
                "state_dict": {k: v.clone() for k, v in G.state_dict().items()}}
        for out_name, call in CALLS.items():
            case[out_name] = G(z, c, **call).float()
        G.train()  # training mode: w_avg tracking and the unfused modulated convolution
        case["img_train_none"] = G(z, c, noise_mode="none", force_fp32=True)
        case["w_avg_after_train_call"] = G.mapping.w_avg.clone()
        out[name] = case
    torch.save(out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
