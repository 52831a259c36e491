"""refiner.demo.fashion_mnist: the IDX reader (on IDX files the tests write byte by byte), Fashion-MNIST lookup, the
checked download (from a local HTTP server) and the conversion to 32x32 images in [-1, 1]."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import refiner.demo.fashion_mnist as ds
from common.errors import UserError
from refiner.cli import cli


def idx_bytes(type_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file as LeCun's page describes it: 0, 0, type, ndim, big-endian uint32 sizes, data."""
    return bytes([0, 0, type_code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + payload


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_uint8_images_plain_and_gzip(tmp_path: Path, compress: bool):
    data = idx_bytes(0x08, (2, 2, 3), bytes(range(12)))
    path = tmp_path / ("x.gz" if compress else "x")
    path.write_bytes(gzip.compress(data) if compress else data)
    x = ds.read_idx(path)
    assert x.dtype == np.uint8 and x.shape == (2, 2, 3)
    assert x.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


def test_read_idx_big_endian_types(tmp_path: Path):
    cases = [(0x0B, b"\x01\x02\xff\xfe", [258, -2]),  # int16
             (0x0C, b"\x00\x01\x00\x00\xff\xff\xff\xff", [65536, -1]),  # int32
             (0x0D, struct.pack(">2f", 1.5, -2.25), [1.5, -2.25]),  # float32
             (0x09, b"\x7f\x80", [127, -128])]  # int8
    for code, payload, expected in cases:
        (tmp_path / "v").write_bytes(idx_bytes(code, (2,), payload))
        assert ds.read_idx(tmp_path / "v").tolist() == expected


def test_write_idx_matches_the_format(tmp_path: Path):
    a = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    ds.write_idx(tmp_path / "a.gz", a, compress=True)
    expected = idx_bytes(0x0C, (2, 3), a.astype(">i4").tobytes())
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == expected
    np.testing.assert_array_equal(ds.read_idx(tmp_path / "a.gz"), a)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),  # bad magic
    (b"\x00\x00\x08\x02\x00\x00\x00\x02", "cut short"),  # header promises two sizes, has one
    (idx_bytes(0x08, (2, 3), bytes(5)), r"announces shape \[2, 3\]"),  # one byte of data missing
])
def test_read_idx_rejects_malformed_files(tmp_path: Path, content: bytes, message: str):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(UserError, match=message):
        ds.read_idx(tmp_path / "bad")


def test_to_images_pads_to_32_and_scales():
    pixels = np.zeros((1, 28, 28), np.uint8)
    pixels[0, 0, 0], pixels[0, 27, 27], pixels[0, 5, 6] = 255, 255, 51
    x = ds.to_images(pixels)
    assert x.shape == (1, 1, 32, 32) and x.dtype == torch.float32
    assert x[0, 0, 2, 2] == 1 and x[0, 0, 29, 29] == 1
    assert torch.isclose(x[0, 0, 7, 8], torch.tensor(51 / 127.5 - 1))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[0, 0][border] == -1).all()


def _fake_dataset(folder: Path) -> dict[tuple[str, str], ds.IDXFile]:
    """Four tiny gzip'd IDX files with Fashion-MNIST's names, and specs holding their checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    specs = {}
    for (split, kind), spec in ds.FASHION_MNIST.items():
        n = 6 if split == "train" else 4
        array = rng.integers(0, 256, (n, 28, 28)) if kind == "images" else rng.integers(0, 10, n)
        raw = idx_bytes(0x08, array.shape, array.astype(np.uint8).tobytes())
        packed = gzip.compress(raw)
        (folder / f"{spec.name}.gz").write_bytes(packed)
        specs[(split, kind)] = ds.IDXFile(spec.name, hashlib.sha256(packed).hexdigest(),
                                          hashlib.sha256(raw).hexdigest())
    return specs


def test_load_split_checks_the_published_checksums(tmp_path: Path, monkeypatch):
    specs = _fake_dataset(tmp_path / "fm")
    with pytest.raises(UserError, match="not the published Fashion-MNIST"):
        ds.load_split("test", root=tmp_path / "fm")
    images, labels = ds.load_split("test", root=tmp_path / "fm", check=False)
    assert images.shape == (4, 28, 28) and labels.shape == (4,) and labels.dtype == np.int64
    monkeypatch.setattr(ds, "FASHION_MNIST", specs)
    images2, _ = ds.load_split("test", root=tmp_path / "fm")
    np.testing.assert_array_equal(images, images2)


def test_missing_dataset_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        ds.load_split("train", root=tmp_path)


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Files, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_checks_sha256_and_fills_the_folder(tmp_path: Path, monkeypatch, file_server):
    served, url = file_server
    specs = _fake_dataset(served)
    monkeypatch.setattr(ds, "FASHION_MNIST", specs)
    monkeypatch.setattr(ds, "FASHION_MNIST_URL", url)
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["data", "fashion-mnist", "--dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for spec in specs.values():
        assert (tmp_path / "out" / f"{spec.name}.gz").read_bytes() == (served / f"{spec.name}.gz").read_bytes()
    images, _ = ds.load_split("train", root=tmp_path / "out")
    assert images.shape == (6, 28, 28)
    # a file on the server that is not the expected one: refused, nothing kept
    wrong = dict(specs)
    key = ("test", "labels")
    wrong[key] = ds.IDXFile(specs[key].name, "0" * 64, "0" * 64)
    monkeypatch.setattr(ds, "FASHION_MNIST", wrong)
    with pytest.raises(UserError, match="checksum mismatch"):
        ds.download(tmp_path / "out2")
    assert not (tmp_path / "out2" / f"{specs[key].name}.gz").exists()
