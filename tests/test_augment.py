"""EDM's AugmentPipe (refiner.augment) against the original's outputs, and its parameters against its labels."""

from __future__ import annotations

import math

import torch

from refiner.augment import AUGMENT_DIM, AugmentPipe
from tests.helpers import DATA

ONLY = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def test_matches_edm_augment_pipe_bit_for_bit():
    """tests/data/edm_augment_reference.pt: NVlabs/edm's AugmentPipe with Diff-Instruct's settings after
    torch.manual_seed(seed); ours drawing from a generator seeded alike gives the same images and labels."""
    reference = torch.load(DATA / "edm_augment_reference.pt", weights_only=True)
    for case in reference["cases"]:
        pipe = AugmentPipe(p=case["p"])
        params = pipe.sample(case["images"].shape[0], torch.Generator().manual_seed(case["seed"]))
        images, labels = pipe(case["images"], params)
        torch.testing.assert_close(labels, case["labels"], rtol=0, atol=0)
        torch.testing.assert_close(images, case["augmented"], rtol=0, atol=1e-6)
        assert (images - case["images"]).abs().max() > 0.1  # the reference is not the identity


def test_xflip_alone_flips_exactly_the_samples_its_label_names():
    pipe = AugmentPipe(p=1.0, **{**ONLY, "xflip": 1})
    images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out, labels = pipe(images, pipe.sample(64, torch.Generator().manual_seed(1)))
    flipped = labels[:, 0] == 1
    assert labels.shape == (64, 1) and 10 < int(flipped.sum()) < 54
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])


def test_labels_are_the_applied_parameters_and_zero_where_not_applied():
    pipe = AugmentPipe(p=0.5)
    params = pipe.sample(4000, torch.Generator().manual_seed(0))
    labels = pipe.labels(params)
    assert labels.shape == (4000, AUGMENT_DIM) and pipe.label_dim == AUGMENT_DIM
    theta = params["rotate"]
    expected = torch.stack([params["xflip"], params["yflip"], params["scale"], theta.cos() - 1, theta.sin(),
                            params["aniso"] * params["aniso_angle"].cos(),
                            params["aniso"] * params["aniso_angle"].sin(),
                            params["translate_x"], params["translate_y"]], dim=1)
    assert torch.equal(labels, expected)
    # x-flips happen half of the time whatever p (multiplier 1e8); the others with probability p = 0.5
    applied = (labels != 0).float().mean(0)
    assert abs(applied[0] - 0.5) < 0.03
    for column in (1, 2, 4, 7):  # yflip is 1/2 of p (a coin flip when applied)
        target = 0.25 if column == 1 else 0.5
        assert abs(applied[column] - target) < 0.03, column
    # rotations cover the full circle; translations have the documented std (in units of 0.125 · size)
    assert theta.abs().max() > 0.99 * math.pi
    assert abs(params["translate_x"][params["translate_x"] != 0].std() - 1) < 0.05


def test_rotation_by_a_quarter_turn_is_rot90():
    """θ = π/2 maps the pixel grid onto itself: the warp is a 90° rotation (output (x, y) shows input
    (−y, x), x right, y down, as EDM's matrices say) of a smooth image up to the filters' passband error."""
    pipe = AugmentPipe(p=1.0, **{**ONLY, "rotate_frac": 1})
    y, x = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    image = (torch.sin(2 * x) + 0.5 * torch.cos(3 * y + x)).reshape(1, 1, 24, 24)
    out, labels = pipe(image, {"rotate": torch.tensor([math.pi / 2])})
    torch.testing.assert_close(labels, torch.tensor([[math.cos(math.pi / 2) - 1, 1.0]]))
    assert (out - torch.rot90(image, k=1, dims=(2, 3))).abs().max() < 0.025
    assert (out - torch.rot90(image, k=-1, dims=(2, 3))).abs().max() > 1  # the other sense is far off
