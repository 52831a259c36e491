"""--data: the image sets of `refiner metrics` fitted to a teacher (resolution, channels, labels), drawn with
the loop's generator; the toy's target samples as its real data."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from common.errors import UserError
from refiner.realdata import TargetData, open_real_data, require_data
from teachers.analytic import ring


def _images(n: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _zip(path, images: np.ndarray, labels: list | None) -> None:
    names = [f"{i // 10:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for name, img in zip(names, images):
            buf = io.BytesIO()
            PIL.Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
        if labels is not None:
            z.writestr("dataset.json", json.dumps({"labels": [[n, c] for n, c in zip(names, labels)]}))


def test_zip_with_labels_gives_scaled_images_and_one_hot_labels(tmp_path):
    images = _images(6, 8)
    _zip(tmp_path / "d.zip", images, [0, 2, 1, 2, 0, 1])
    data = open_real_data(tmp_path / "d.zip", (3, 8, 8), classes=3)
    x, c = data.draw(4, torch.Generator().manual_seed(5))
    idx = torch.randint(6, (4,), generator=torch.Generator().manual_seed(5))  # the draw: uniform indices
    expected = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(c, torch.eye(3)[torch.tensor([0, 2, 1, 2, 0, 1])[idx]])


def test_npz_area_downsampled_to_the_teacher_and_parts_are_slices_of_one_draw(tmp_path):
    images = _images(5, 16, seed=1)
    np.savez(tmp_path / "d.npz", x=images)
    data = open_real_data(tmp_path / "d.npz", (3, 8, 8), classes=0)
    whole, labels = data.draw(4, torch.Generator().manual_seed(0))
    assert labels is None and whole.shape == (4, 3, 8, 8)
    idx = torch.randint(5, (4,), generator=torch.Generator().manual_seed(0))
    full = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).double() / 127.5 - 1
    block_mean = full.reshape(4, 3, 8, 2, 8, 2).mean((3, 5))  # 2x2 box average
    torch.testing.assert_close(whole.double(), block_mean, rtol=0, atol=1e-6)
    halves = [data.draw(4, torch.Generator().manual_seed(0), slice(k * 2, k * 2 + 2))[0] for k in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)


def test_grayscale_folder_for_a_one_channel_teacher(tmp_path):
    gray = _images(3, 8, seed=2, channels=1)
    for i, img in enumerate(gray):
        PIL.Image.fromarray(img[..., 0], mode="L").save(tmp_path / f"{i}.png")
    x, _ = open_real_data(tmp_path, (1, 8, 8), classes=0).draw(3, torch.Generator().manual_seed(1))
    assert x.shape == (3, 1, 8, 8)
    values = {round(float(v), 4) for v in (torch.from_numpy(gray).float() / 127.5 - 1).flatten()}
    assert {round(float(v), 4) for v in x.flatten()} <= values


def _npz(size: int):
    return lambda p: np.savez(p / "d.npz", x=_images(2, size))


@pytest.mark.parametrize("make, shape, classes, message", [
    (_npz(12), (3, 8, 8), 0, "cannot be area-downsampled to the teacher's 8x8"),
    (_npz(4), (3, 8, 8), 0, "images are 4x4 and cannot"),
    (_npz(8), (1, 8, 8), 0, "in colour but the teacher has one channel"),
    (_npz(8), (3, 8, 8), 10, "conditional \\(10 classes\\) but the data has no labels"),
    (lambda p: _zip(p / "d.zip", _images(2, 8), [0, 12]), (3, 8, 8), 10, "labels range over 0..12 but the teacher"),
    (lambda p: (p / "d.npz").write_bytes(b"not a zip"), (3, 8, 8), 0, "not an .npz file"),
    (lambda p: None, (3, 8, 8), 0, "no such file or folder"),
])
def test_data_that_does_not_fit_is_one_line_user_error(tmp_path, make, shape, classes, message):
    make(tmp_path)
    path = tmp_path / ("d.zip" if (tmp_path / "d.zip").exists() else "d.npz")
    with pytest.raises(UserError, match=message) as info:
        open_real_data(path, shape, classes)
    assert "\n" not in str(info.value)


def test_adversarial_losses_refuse_to_run_without_data():
    with pytest.raises(UserError, match="--loss dmd2 trains a discriminator on real images: give them with --data"):
        require_data("dmd2", None)
    require_data("ikl", None)


def test_toy_target_samples_are_its_real_data():
    target = ring(std=0.1)
    x, labels = TargetData(target).draw(6, torch.Generator().manual_seed(3), slice(2, 4))
    torch.testing.assert_close(x, target.sample(6, torch.Generator().manual_seed(3))[2:4], rtol=0, atol=0)
    assert labels is None
