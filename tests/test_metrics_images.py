"""Image-set readers (folder, dataset zip, npz), quantisation and image grids."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from metrics_helpers import random_images, write_folder

from common.errors import UserError
from metrics.images import image_grid, open_image_set, quantize, save_image_grid, to_rgb


def _all(image_set, batch_size=3, indices=None) -> np.ndarray:
    batches = list(image_set.batches(batch_size, indices))
    assert all(b.dtype == torch.uint8 and b.shape[1] == 3 for b in batches)
    return torch.cat(batches).numpy().transpose(0, 2, 3, 1)


def test_folder_sorted_recursive_exact_pixels(tmp_path):
    imgs = random_images(5, seed=0)
    for name, img in zip(["b.png", "a.png", "sub/c.png", "sub/a.png", "d.PNG"], imgs):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(img).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    s = open_image_set(tmp_path)
    assert s.names == ["a.png", "b.png", "d.PNG", "sub/a.png", "sub/c.png"]
    np.testing.assert_array_equal(_all(s), imgs[[1, 0, 4, 3, 2]])
    np.testing.assert_array_equal(_all(s, indices=[4, 0]), imgs[[2, 1]])
    assert s.labels is None


def test_grayscale_repeated_to_rgb_and_jpeg_readable(tmp_path):
    gray = random_images(2, seed=1)[..., 0]
    PIL.Image.fromarray(gray[0], mode="L").save(tmp_path / "0.png")
    PIL.Image.fromarray(random_images(1, seed=2)[0]).save(tmp_path / "1.jpg", quality=95)
    out = _all(open_image_set(tmp_path))
    np.testing.assert_array_equal(out[0], np.repeat(gray[0][..., None], 3, axis=2))
    assert out.shape == (2, 8, 8, 3)


def test_dataset_zip_with_labels(tmp_path):
    imgs = random_images(4, seed=3)
    path = tmp_path / "data.zip"
    names = ["00000/img00001.png", "00000/img00000.png", "00001/img00003.png", "00001/img00002.png"]
    with zipfile.ZipFile(path, "w") as z:
        for name, img in zip(names, imgs):
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]}))
    s = open_image_set(path)
    assert s.names == sorted(names)
    np.testing.assert_array_equal(_all(s), imgs[[1, 0, 3, 2]])
    np.testing.assert_array_equal(s.labels, [1, 0, 0, 2])


def test_zip_without_label_for_an_image(tmp_path):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.png", b"")
        z.writestr("dataset.json", json.dumps({"labels": [["b.png", 0]]}))
    with pytest.raises(UserError, match="no label for 'a.png'"):
        open_image_set(path)


@pytest.mark.parametrize("key", ["x", "arr_0", "images"])
def test_npz_keys_and_layouts(tmp_path, key):
    imgs = random_images(5, seed=4)
    np.savez(tmp_path / "s.npz", **{key: imgs})
    np.testing.assert_array_equal(_all(open_image_set(tmp_path / "s.npz")), imgs)


def test_npz_grayscale_nhw(tmp_path):
    gray = random_images(3, seed=5)[..., 1]
    np.savez(tmp_path / "g.npz", x=gray)
    np.testing.assert_array_equal(_all(open_image_set(tmp_path / "g.npz")), np.repeat(gray[..., None], 3, 3))


@pytest.mark.parametrize("arrays, match", [
    (dict(x=np.zeros((2, 8, 8, 3), np.float32)), "uint8"),
    (dict(a=np.zeros((2, 8, 8, 3), np.uint8), b=np.zeros(2)), "key 'x'"),
    (dict(mu=np.zeros(4), sigma=np.eye(4)), "statistics"),
    (dict(x=np.zeros((2, 8, 8, 5), np.uint8)), "C = 1 or 3"),
    (dict(mu=np.zeros(4)), "holds mu without sigma: FID statistics need both"),
    (dict(x=np.array([{"a": 1}], dtype=object)), r"holds Python objects \(pickled data\), which are never loaded"),
    ("text", r"not an .npz file \(numpy.savez writes a zip archive of arrays\)"),
])
def test_npz_errors(tmp_path, arrays, match):
    if arrays == "text":
        (tmp_path / "bad.npz").write_text("hello")
    else:
        np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=match):
        list(open_image_set(tmp_path / "bad.npz").batches())


def test_an_unreadable_image_in_a_zip_is_named_without_python_reprs(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.writestr("img0000.png", b"not an image")
    with pytest.raises(UserError) as info:
        list(open_image_set(tmp_path / "set.zip").batches())
    assert "cannot read image 'img0000.png' (not an image file PIL recognises)" in str(info.value)
    assert "BytesIO" not in str(info.value)


def test_set_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        open_image_set(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file"):
        open_image_set(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(UserError, match="expected an image folder"):
        open_image_set(tmp_path / "x.txt")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable zip"):
        open_image_set(tmp_path / "bad.zip")

    mixed = write_folder(tmp_path / "mixed", random_images(3, seed=6))
    PIL.Image.fromarray(random_images(1, seed=7, size=16)[0]).save(mixed / "img0002.png")
    with pytest.raises(UserError, match="'img0002.png' is 16x16 but the first is 8x8"):
        list(open_image_set(mixed).batches(2))

    broken = write_folder(tmp_path / "broken", random_images(2, seed=8))
    (broken / "img0001.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="cannot read image 'img0001.png'"):
        list(open_image_set(broken).batches())


def test_content_hash_follows_bytes(tmp_path):
    a = write_folder(tmp_path / "a", random_images(3, seed=9))
    b = write_folder(tmp_path / "b", random_images(3, seed=9))
    assert open_image_set(a).content_hash() == open_image_set(b).content_hash()
    PIL.Image.fromarray(random_images(1, seed=10)[0]).save(b / "img0001.png")
    assert open_image_set(a).content_hash() != open_image_set(b).content_hash()


def test_quantize_matches_nvidia_rounding():
    levels = torch.arange(256, dtype=torch.float32)
    x = (levels - 127.5) / 127.5  # the [-1, 1] image whose exact uint8 value is `levels`
    assert torch.equal(quantize(x), levels.to(torch.uint8))
    # (x * 127.5 + 128) truncated: round to nearest, clamped
    assert quantize(torch.tensor([-2.0, -1.0, 0.0, 0.003, 0.004, 1.0, 3.0])).tolist() == [0, 0, 128, 128, 128,
                                                                                              255, 255]
    assert to_rgb(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)).shape == (2, 3, 4, 4)


def test_image_grid_layouts_and_png(tmp_path):
    imgs = random_images(5, seed=11)  # NHWC
    grid = np.asarray(image_grid(imgs))
    assert grid.shape == (16, 24, 3)  # ceil(sqrt 5) = 3 columns, 2 rows
    np.testing.assert_array_equal(grid[8:16, 0:8], imgs[3])
    np.testing.assert_array_equal(grid[8:16, 16:24], 0)
    nchw = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy())
    path = save_image_grid(nchw, tmp_path / "g" / "grid.png", cols=5)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(path)), np.concatenate(list(imgs), axis=1))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left
    with pytest.raises(ValueError, match="uint8"):
        image_grid(imgs.astype(np.float32))


def test_image_grid_keeps_gray_when_asked():
    gray = np.random.default_rng(3).integers(0, 256, (3, 1, 5, 5), dtype=np.uint8)  # NCHW, one channel
    kept = image_grid(gray, keep_gray=True)
    assert kept.mode == "L" and np.asarray(kept).shape == (10, 10)
    np.testing.assert_array_equal(np.asarray(kept)[5:10, 0:5], gray[2, 0])
    np.testing.assert_array_equal(np.asarray(image_grid(gray)), np.repeat(np.asarray(kept)[:, :, None], 3, axis=2))


def test_16_bit_images_are_refused_not_clipped(tmp_path):
    """convert("RGB") clips a 16-bit sample of 40000 to 255: the set would be measured as white images."""
    folder = tmp_path / "deep"
    folder.mkdir()
    PIL.Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / "img0000.png")
    with pytest.raises(UserError, match=r"image 'img0000.png' has 16-bit samples \(PIL mode I;16\); the metrics "
                                        "read 8-bit images"):
        list(open_image_set(folder).batches())
