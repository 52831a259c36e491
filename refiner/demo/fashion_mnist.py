"""Fashion-MNIST (Xiao et al. 2017, MIT licence): the IDX file reader, where the files are found, the
checked download, and the conversion to the images every model of ours takes (NCHW float in [-1, 1]).

IDX format (LeCun's MNIST page): two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), a byte with the number of dimensions d, then d big-endian
uint32 sizes, then the values in C order, big-endian. The files may be gzip-compressed (.gz).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from fileformats.atomic import atomic_write
from fileformats.sources import cache_root, cached_path, file_sha256, open_source

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (plain or gzip'd, told apart by the gzip magic bytes), in native
    byte order. A malformed file is a UserError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == _GZIP_MAGIC
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read IDX file {path} ({e}); the file is damaged: download it "
                        "again") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic {data[:4].hex()}); give an IDX file "
                        "such as train-images-idx3-ubyte.gz")
    dtype, ndim = np.dtype(IDX_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: the IDX header is cut short; the file is damaged: download it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{path}: the IDX header announces shape {list(shape)} ({expected} bytes of data) "
                        f"but the file holds {len(data) - header}; the file is damaged: download it again")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool = False) -> None:
    """Write `array` as an IDX file (gzip'd if `compress`); the inverse of read_idx (used by tests)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
    array = np.asarray(array)
    code = codes[array.dtype.newbyteorder("=")]
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + array.astype(IDX_TYPES[code]).tobytes())
    atomic_write(path, lambda f: f.write(gzip.compress(payload, mtime=0) if compress else payload))


@dataclass(frozen=True)
class IDXFile:
    name: str  # as published, without .gz
    sha256_gz: str  # of the published .gz file
    sha256: str  # of the uncompressed file


FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST = {
    ("train", "images"): IDXFile("train-images-idx3-ubyte",
                                 "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                                 "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train", "labels"): IDXFile("train-labels-idx1-ubyte",
                                 "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                                 "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("test", "images"): IDXFile("t10k-images-idx3-ubyte",
                                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("test", "labels"): IDXFile("t10k-labels-idx1-ubyte",
                                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
MISSING_HELP = ("install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), download it with "
                "`refiner data fashion-mnist`, or point $REFINER_FASHION_MNIST at a folder with the four "
                "IDX files")


def search_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Where the files are looked for, in order: `root` (alone, when given), $REFINER_FASHION_MNIST, the
    Debian package's folder, the download cache."""
    if root is not None:
        return [Path(root)]
    env = os.environ.get("REFINER_FASHION_MNIST")
    return [*([Path(env)] if env else []), *map(Path, FASHION_MNIST_DIRS),
            cache_root() / "datasets" / "fashion-mnist"]


def _candidates(folder: Path, spec: IDXFile) -> list[Path]:
    return [folder / f"{spec.name}.gz", folder / spec.name]


def locate(split: str, kind: str, root: str | os.PathLike | None = None) -> Path | None:
    """The first existing file for (split, kind) in the search folders or the URL cache, or None."""
    spec = FASHION_MNIST[(split, kind)]
    paths = [p for d in search_dirs(root) for p in _candidates(d, spec)]
    if root is None:
        paths.append(cached_path(FASHION_MNIST_URL + spec.name + ".gz"))
    return next((p for p in paths if p.is_file()), None)


def verify(path: Path, spec: IDXFile) -> str:
    """The file's sha256 if it is the published file (.gz or uncompressed), else a UserError."""
    digest = file_sha256(path)
    if digest not in (spec.sha256_gz, spec.sha256):
        raise UserError(f"{path} is not the published Fashion-MNIST {spec.name} (sha256 {digest}); "
                        f"delete it and {MISSING_HELP}")
    return digest


def download(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Make the four files available (download what is not found, checking the sha256 of everything);
    returns {file name: path}. With `root`, only that folder counts and downloads are copied into it."""
    found = {}
    for (split, kind), spec in FASHION_MNIST.items():
        path = locate(split, kind, root)
        if path is None:
            path = open_source(FASHION_MNIST_URL + spec.name + ".gz", sha256=spec.sha256_gz)
            if root is not None:
                target = Path(root) / f"{spec.name}.gz"
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, lambda f, src=path: f.write(src.read_bytes()))
                path = target
        verify(path, spec)
        found[spec.name] = path
    return found


def load_split(split: str, root: str | os.PathLike | None = None, check: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of 'train' (60 000) or 'test' (10 000)."""
    if split not in ("train", "test"):
        raise UserError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}")
    arrays = []
    for kind in ("images", "labels"):
        path = locate(split, kind, root)
        if path is None:
            where = ", ".join(str(d) for d in search_dirs(root))
            raise UserError(f"Fashion-MNIST {split} {kind} not found (looked in {where}); {MISSING_HELP}")
        if check:
            verify(path, FASHION_MNIST[(split, kind)])
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise UserError(f"Fashion-MNIST {split}: unexpected arrays {images.dtype} {list(images.shape)} and "
                        f"{list(labels.shape)}")
    return images, labels.astype(np.int64)


def data_hash(root: str | os.PathLike | None = None) -> dict[str, str]:
    """sha256 of each of the four files used (as found), for manifests."""
    return {spec.name: file_sha256(locate(split, kind, root))
            for (split, kind), spec in FASHION_MNIST.items()}


def to_images(pixels: np.ndarray | torch.Tensor, pad: int = 2) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28 + 2·pad, 28 + 2·pad] in [-1, 1] (x/127.5 − 1), padded with the
    background value −1 (Fashion-MNIST's background is 0), so 28 px becomes 32 px."""
    x = torch.as_tensor(np.asarray(pixels)).to(torch.float32).div(127.5).sub(1)
    return torch.nn.functional.pad(x[:, None], (pad, pad, pad, pad), value=-1.0)
