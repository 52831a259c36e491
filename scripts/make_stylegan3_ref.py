"""Write the StyleGAN3-repository fixtures in tests/data: small snapshots made by NVlabs/stylegan3's own
code (its StyleGAN2 config, StyleGAN3-T and StyleGAN3-R) and the reference outputs of that code.

It needs a checkout of NVlabs/stylegan3 (imported from there, never copied) and runs on CPU, where the
custom CUDA ops fall back to NVIDIA's reference implementations:

    PYTHONPATH=$PWD python scripts/make_stylegan3_ref.py --nvidia /path/to/stylegan3

(`torch_utils/ops/conv2d_gradfix.py` imports `pkg_resources`; without setuptools put a stub module
with `parse_version` on the path.) For each case the snapshot dict is written as training_loop.py
writes it (G, D, G_ema, augment_pipe None, training_set_kwargs; networks copied, eval mode, no grad),
checked to load in NVIDIA's `legacy.load_network_pkl` and to re-write byte for byte with our reader
and writer, and then stored in tests/data with every `module_src` replaced by a placeholder (so the
fixture holds no NVIDIA source). `<case>.ref.pt` holds the inputs and the original's outputs.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import pickle
import sys
from pathlib import Path

import torch

from fileformats import nvpickle

PLACEHOLDER = "# module source omitted from this test fixture\n"

# train.py's G_kwargs (class_name popped) plus common_kwargs; tiny channel counts and layer counts
CASES = {
    "sg3-stylegan2-cond": dict(
        module="networks_stylegan2", z_dim=16, w_dim=16, mapping_kwargs=dict(num_layers=2),
        channel_base=64, channel_max=8, fused_modconv_default="inference_only",
        c_dim=4, img_resolution=32, img_channels=3),
    "sg3-t-uncond": dict(
        module="networks_stylegan3", z_dim=16, w_dim=16, mapping_kwargs=dict(num_layers=2),
        channel_base=96, channel_max=8, magnitude_ema_beta=0.5 ** (32 / 20e3), num_layers=6,
        c_dim=0, img_resolution=32, img_channels=3),
    "sg3-r-cond": dict(
        module="networks_stylegan3", z_dim=16, w_dim=16, mapping_kwargs=dict(num_layers=2),
        channel_base=192, channel_max=16, magnitude_ema_beta=0.5 ** (32 / 20e3), conv_kernel=1,
        use_radial_filters=True, num_layers=6, margin_size=6,
        c_dim=4, img_resolution=32, img_channels=3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvidia", required=True, help="checkout of NVlabs/stylegan3")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "tests/data"))
    args = parser.parse_args()
    sys.path.insert(0, args.nvidia)
    import dnnlib  # NVIDIA's code, run from their checkout
    import legacy
    from training import networks_stylegan2, networks_stylegan3

    for i, (name, spec) in enumerate(CASES.items()):
        kwargs = dict(spec)
        module = {"networks_stylegan2": networks_stylegan2, "networks_stylegan3": networks_stylegan3}[
            kwargs.pop("module")]
        kwargs["mapping_kwargs"] = dnnlib.EasyDict(kwargs["mapping_kwargs"])
        torch.manual_seed(200 + i)
        G = module.Generator(**kwargs).train().requires_grad_(False)
        with torch.no_grad():  # non-trivial values everywhere but the designed filters and Fourier features
            for key, t in G.state_dict().items():
                if key.endswith(("resample_filter", "up_filter", "down_filter", "freqs", "phases", "transform")):
                    continue
                if key.endswith("magnitude_ema"):
                    t.copy_(torch.rand([]) + 0.5)
                else:
                    t.add_(torch.randn_like(t) * 0.2)
            if name == "sg3-r-cond":  # a user transform (rotation + translation), as gen_images.py sets
                angle = torch.tensor(0.3)
                G.synthesis.input.transform.copy_(torch.tensor([
                    [angle.cos(), angle.sin(), 0.1], [-angle.sin(), angle.cos(), -0.2], [0, 0, 1]]))
        G_ema = copy.deepcopy(G)
        with torch.no_grad():
            for t in G_ema.parameters():
                t.add_(torch.randn_like(t) * 0.02)
        D = networks_stylegan2.Discriminator(
            c_dim=kwargs["c_dim"], img_resolution=32, img_channels=3, channel_base=64, channel_max=8,
            block_kwargs=dnnlib.EasyDict(freeze_layers=0), mapping_kwargs=dnnlib.EasyDict(),
            epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=4))
        training_set_kwargs = dnnlib.EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="/nonexistent/data.zip",
            use_labels=kwargs["c_dim"] > 0, max_size=1000, xflip=False, resolution=32, random_seed=0)
        snapshot = dict(G=G, D=D, G_ema=G_ema, augment_pipe=None, training_set_kwargs=dict(training_set_kwargs))
        for key, value in snapshot.items():
            if isinstance(value, torch.nn.Module):
                snapshot[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
        raw = pickle.dumps(snapshot)

        # NVIDIA's loader reads it; our reader and writer reproduce it byte for byte
        loaded = legacy.load_network_pkl(io.BytesIO(raw))
        assert type(loaded["G_ema"]).__name__ == "Generator"
        ours = nvpickle.load(raw)
        assert nvpickle.dumps(ours) == raw, f"{name}: re-writing did not reproduce the file"
        for record in nvpickle._records(ours):
            record.module_src = PLACEHOLDER
        out_pkl = Path(args.out) / f"{name}.pkl"
        nvpickle.dump(ours, out_pkl, overwrite=True)

        G_ema = snapshot["G_ema"]
        z = torch.randn([2, kwargs["z_dim"]], generator=torch.Generator().manual_seed(1))
        c = (torch.nn.functional.one_hot(torch.tensor([2, 3]), kwargs["c_dim"]).float()
             if kwargs["c_dim"] else torch.zeros([2, 0]))
        with torch.no_grad():
            ws = G_ema.mapping(z, c)
            ref = {
                "z": z, "c": c, "ws": ws, "num_ws": int(G_ema.num_ws),
                "init_kwargs": json.dumps(dict(kwargs, module=spec["module"])),
                "n_params_G_ema": sum(p.numel() for p in G_ema.parameters()),
                "img_const": G_ema(z, c, noise_mode="const", force_fp32=True),
                "img_none_psi0.6_cutoff3": G_ema(z, c, truncation_psi=0.6, truncation_cutoff=3,
                                                 noise_mode="none", force_fp32=True),
                "G_img_const": snapshot["G"](z, c, noise_mode="const", force_fp32=True),
            }
        torch.save(ref, Path(args.out) / f"{name}.ref.pt")
        print(f"{name}: {out_pkl.stat().st_size:,} bytes, {ref['n_params_G_ema']:,} G_ema parameters")


if __name__ == "__main__":
    main()
