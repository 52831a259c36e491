"""Image sets for metrics (folders, NVIDIA dataset zips, .npz arrays) read as uint8 NCHW RGB batches,
the NVIDIA quantisation of generator output, and image grids.

Formats:
- folder: image files (png, jpg, jpeg, bmp, webp) anywhere below it, in sorted relative-path order;
- dataset zip (StyleGAN2-ADA / EDM dataset_tool): image files inside the archive, sorted, and an optional
  `dataset.json` = {"labels": [[relative/file/name.png, label], ...]} (or "labels": null);
- .npz: one uint8 array [N, H, W, C] (C = 1 or 3) or [N, H, W], under the key 'x', 'arr_0' or alone.
Grayscale images are repeated to 3 channels (the detector expects RGB); an alpha channel is dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import torch

from common.errors import UserError
from fileformats.atomic import atomic_open
from fileformats.npz import read_npz
from fileformats.sources import file_sha256

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ImageArray = Union[np.ndarray, torch.Tensor]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 exactly as NVIDIA's metric code: (x * 127.5 + 128).clamp(0, 255)
    then truncation (the +128 instead of +127.5 makes the truncation round to nearest)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW with 1, 3 or 4 channels -> 3 channels (gray repeated, alpha dropped)."""
    c = images.shape[1]
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    if c in (3, 4):
        return images[:, :3]
    raise UserError(f"images have {c} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")


def _parse_labels(text: bytes, names: Sequence[str], where: str) -> np.ndarray | None:
    """dataset.json {"labels": [[name, label], ...] | null} -> labels in the order of `names`."""
    try:
        labels = json.loads(text).get("labels")
    except (ValueError, AttributeError) as e:
        raise UserError(f"{where}: dataset.json is not valid JSON with a 'labels' entry ({e})") from None
    if labels is None:
        return None
    table = {str(k).replace("\\", "/"): v for k, v in labels}
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(f"{where}: dataset.json has no label for {missing[0]!r} ({len(missing)} images "
                        "unlabelled); list every image or set \"labels\": null")
    return np.asarray([table[n] for n in names])


class ImageSet:
    """A set of same-sized images. `batches()` yields uint8 tensors [B, 3, H, W]; `labels` is an array
    (one row per image, from dataset.json) or None; `content_hash()` identifies the bytes on disk."""

    def __init__(self, path: Path, names: list[str], labels: np.ndarray | None = None):
        if not names:
            raise UserError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                            "point to a folder, dataset .zip or .npz that holds images")
        self.path, self.names, self.labels = path, names, labels
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, i: int) -> np.ndarray:
        """Image i as uint8 HWC (C = 1 or 3) or HW."""
        raise NotImplementedError

    def content_hash(self) -> str:
        raise NotImplementedError

    def _decode(self, data: Path | io.BytesIO, name: str) -> np.ndarray:
        try:
            with PIL.Image.open(data) as img:
                if img.mode.startswith(("I", "F")):  # convert("RGB") would clip 16-bit / float values at 255
                    raise UserError(f"{self.path}: image {name!r} has {'16-bit' if '16' in img.mode else '32-bit'} "
                                    f"samples (PIL mode {img.mode}); the metrics read 8-bit images, as NVIDIA's "
                                    "tools do: convert the set to 8 bits per channel first")
                return np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
            reason = "not an image file PIL recognises" if isinstance(e, PIL.UnidentifiedImageError) else str(e)
            raise UserError(f"{self.path}: cannot read image {name!r} ({reason}); remove or replace it") from None

    def batches(self, batch_size: int = 64, indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """uint8 RGB batches [B, 3, H, W] of the images at `indices` (default: all, in order)."""
        order = range(len(self)) if indices is None else indices
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            arrays = []
            for i in chunk:
                a = self._read(i)
                a = a[:, :, None] if a.ndim == 2 else a
                if self._shape is None:
                    self._shape = a.shape[:2]
                if a.shape[:2] != self._shape:
                    raise UserError(f"{self.path}: image {self.names[i]!r} is {a.shape[1]}x{a.shape[0]} but "
                                    f"the first is {self._shape[1]}x{self._shape[0]}; all images of a set "
                                    "must have the same size")
                arrays.append(a)
            channels = {a.shape[2] for a in arrays}
            if len(channels) > 1:  # a grayscale file among RGB ones
                arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[:, :, :3] for a in arrays]
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))
            yield to_rgb(batch)


class FolderImages(ImageSet):
    def __init__(self, path: Path):
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        meta = path / "dataset.json"
        labels = _parse_labels(meta.read_bytes(), files, str(path)) if meta.is_file() and files else None
        super().__init__(path, files, labels)

    def _read(self, i: int) -> np.ndarray:
        return self._decode(self.path / self.names[i], self.names[i])

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for name in self.names:
            h.update(name.encode() + b"\0")
            h.update(bytes.fromhex(file_sha256(self.path / name)))
        return h.hexdigest()


class ZipImages(ImageSet):
    def __init__(self, path: Path):
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{path}: not a readable zip file ({e})") from None
        members = set(self._zip.namelist())
        files = sorted(n for n in members if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        labels = (_parse_labels(self._zip.read("dataset.json"), files, str(path))
                  if "dataset.json" in members and files else None)
        super().__init__(path, files, labels)

    def _read(self, i: int) -> np.ndarray:
        return self._decode(io.BytesIO(self._zip.read(self.names[i])), self.names[i])

    def content_hash(self) -> str:
        return file_sha256(self.path)


def _npz_images(path: Path) -> np.ndarray:
    arrays = read_npz(path)
    keys = list(arrays)
    if "mu" in keys and "sigma" in keys:
        raise UserError(f"{path} holds statistics (mu, sigma), not images; it can only be a --ref")
    if "mu" in keys or "sigma" in keys:
        raise UserError(f"{path} holds {'mu' if 'mu' in keys else 'sigma'} without "
                        f"{'sigma' if 'mu' in keys else 'mu'}: FID statistics need both (and images go under 'x')")
    key = next((k for k in ("x", "arr_0") if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise UserError(f"{path}: found arrays {keys}; store the images under the key 'x' or alone")
    x = arrays[key]
    if x.dtype != np.uint8:
        raise UserError(f"{path}: images must be uint8 0..255, got {x.dtype}; convert them, e.g. "
                        "np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8) for [-1, 1] floats")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3, 4):
        raise UserError(f"{path}: expected images [N, H, W, C] with C = 1 or 3, got shape {list(x.shape)}")
    return x


class NpzImages(ImageSet):
    def __init__(self, path: Path):
        self._x = _npz_images(path)
        super().__init__(path, [f"#{i}" for i in range(len(self._x))])

    def _read(self, i: int) -> np.ndarray:
        return self._x[i]

    def content_hash(self) -> str:
        return file_sha256(self.path)


class ArrayImages(ImageSet):
    """uint8 images held in memory, [N, C, H, W] or [N, H, W, C] (a numpy array or a tensor)."""

    def __init__(self, images: ImageArray):
        try:
            self._x = _to_nhwc(images, keep_gray=True)
        except ValueError as e:
            raise UserError(f"images given as an array: {e}") from None
        super().__init__(Path("<array>"), [f"#{i}" for i in range(len(self._x))])

    def _read(self, i: int) -> np.ndarray:
        return self._x[i]

    def content_hash(self) -> str:
        return hashlib.sha256(repr(self._x.shape).encode() + self._x.tobytes()).hexdigest()


def open_image_set(path: str | os.PathLike) -> ImageSet:
    """An image folder, dataset .zip or .npz of uint8 images."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderImages(path)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return ZipImages(path)
    if suffix == ".npz":
        return NpzImages(path)
    raise UserError(f"{path}: expected an image folder, a dataset .zip or an .npz of uint8 images")


def _to_nhwc(images: ImageArray, keep_gray: bool = False) -> np.ndarray:
    """uint8 [N, C, H, W] or [N, H, W, C] (C in 1, 3, 4; NCHW when both read as channels) -> [N, H, W, 3]
    (with `keep_gray`, one-channel images stay [N, H, W, 1])."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W] or [N, H, W, C], got {x.dtype} {list(x.shape)}")
    if x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if not (keep_gray and x.shape[1] == 1):
        x = to_rgb(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return x.transpose(0, 2, 3, 1)


def image_grid(images: ImageArray, cols: int | None = None, keep_gray: bool = False) -> PIL.Image.Image:
    """Tile N uint8 images into a grid with `cols` columns (default ceil(sqrt(N))), row-major; empty cells
    black. RGB, or with `keep_gray` a grayscale ('L') image for one-channel images."""
    x = _to_nhwc(images, keep_gray)
    n, h, w, c = x.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    return PIL.Image.fromarray(grid[:, :, 0] if c == 1 else grid)


def save_image_grid(images: ImageArray, path: str | os.PathLike, cols: int | None = None) -> Path:
    """Write `image_grid(images, cols)` as a PNG, atomically."""
    grid = image_grid(images, cols)
    with atomic_open(path, "wb") as f:
        grid.save(f, format="PNG")
    return Path(path)
