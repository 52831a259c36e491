"""Small files the tests build with our own code (no NVIDIA code needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from fileformats import nvpickle
from teachers.edm_loader import PLACEHOLDER_SOURCE, network_record
from teachers.edm_precond import EDMPrecond

DATA = Path(__file__).parent / "data"


def small_edm_kwargs(resolution: int = 32, label_dim: int = 0, channels: int = 3) -> dict:
    """The golden NCSN++ fixture's configuration at another resolution / label count."""
    return dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, use_fp16=False,
                model_type="SongUNet", model_channels=16, channel_mult=[1, 2], channel_mult_noise=2,
                num_blocks=1, attn_resolutions=[resolution // 2], augment_dim=9, dropout=0.13,
                embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                resample_filter=[1, 3, 3, 1])


def write_edm_teacher(path: Path, seed: int = 0, **kw) -> Path:
    """An EDM snapshot pickle ({'ema': EDMPrecond}) with random weights, in NVIDIA's layout."""
    kwargs = small_edm_kwargs(**kw)
    torch.manual_seed(seed)
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # layers that start at zero get non-zero weights too
    nvpickle.dump({"ema": network_record(net, kwargs)}, path)
    return path


def write_edm2_teacher(path: Path, ref: dict | None = None, encoder: str = "StandardRGBEncoder") -> Path:
    """An EDM2 pickle in NVIDIA's layout (EasyDict {encoder, dataset_kwargs, loss_fn, ema}, `ema` stored
    in float16) holding the golden EDM2 fixture's weights, written by our writer (placeholder source)."""
    from teachers.edm2 import Precond as EDM2Precond

    ref = ref if ref is not None else torch.load(DATA / "edm2-small.ref.pt")
    kwargs = ref["kwargs"]
    net = EDM2Precond(**kwargs)
    net.load_state_dict(ref["state"])
    net = net.to(torch.float16).eval()

    def plain(class_name: str, state: dict, init_kwargs: dict) -> nvpickle.PersistentObject:
        return nvpickle.PersistentObject(class_name=class_name, module_src=PLACEHOLDER_SOURCE, version=6,
                                         state={**state, "_init_args": (), "_init_kwargs": init_kwargs})

    data = nvpickle.EasyDict(
        encoder=plain(encoder, {}, {}),
        dataset_kwargs=nvpickle.EasyDict(class_name="training.dataset.ImageFolderDataset", path="x",
                                         use_labels=True),
        loss_fn=plain("EDM2Loss", {"P_mean": -0.8, "P_std": 1.6, "sigma_data": 0.5}, {"P_mean": -0.8, "P_std": 1.6}),
        ema=network_record(net, kwargs))
    nvpickle.dump(data, path)
    return path


def seeded_state_dict(ref: dict) -> dict[str, torch.Tensor]:
    """A reference fixture's state dict, regenerated: parameters are seeded normal draws (in sorted name
    order, std ref['std']), buffers are stored in the fixture. Names and shapes are those of the
    original network, recorded when the reference outputs were made with the original code."""
    gen = torch.Generator().manual_seed(ref["seed"])
    drawn = {name: torch.randn(ref["shapes"][name], generator=gen) * ref["std"]
             for name in sorted(ref["shapes"]) if name not in ref["buffers"]}
    return {name: ref["buffers"][name] if name in ref["buffers"] else drawn[name] for name in ref["shapes"]}


def assert_same(a, b, where: str = "top") -> None:
    """Deep equality of two objects (training states, unpickled records, nested dicts / lists of tensors and
    plain data): types, key order, tensor bits, dtypes and layout, records field by field; a difference names
    its path."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, nvpickle.PersistentObject):
        assert (a.class_name, a.module_src, a.version) == (b.class_name, b.module_src, b.version), where
        assert_same(a.state, b.state, f"{where}<{a.class_name}>")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), where
        assert a.requires_grad == b.requires_grad and torch.equal(a, b), where
    elif isinstance(a, torch.nn.Module):
        assert_same(a.__dict__, b.__dict__, f"{where}<{type(a).__name__}>")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
