"""`refiner sample` on the golden EDM fixtures: grid + npz written, per-seed images, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from common.errors import UserError
from refiner.cli import cli
from refiner.cli.sample import parse_seeds, to_uint8

DATA = Path(__file__).parent / "data"
COND = str(DATA / "edm-small-ddpmpp-edm-cond.pkl")
UNCOND = str(DATA / "edm-small-ncsnpp-edm-uncond.pkl")


def run(*args: str):
    return CliRunner().invoke(cli, ["sample", *args])


def test_writes_grid_and_npz(tmp_path):
    result = run("--teacher", COND, "--seeds", "0-4", "--out", str(tmp_path / "a"), "--steps", "2",
                 "--batch", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "a" / "samples.npz") as f:
        x, seeds, labels = f["x"], f["seeds"], f["labels"]
    assert x.shape == (5, 16, 16, 3) and x.dtype == np.uint8
    assert seeds.tolist() == [0, 1, 2, 3, 4] and ((labels >= 0) & (labels < 10)).all()
    grid = np.asarray(PIL.Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (2 * 16, 3 * 16, 3)  # 5 images in 3 columns, row by row, last cell empty
    assert np.array_equal(grid[16:32, 0:16], x[3]) and (grid[16:32, 32:48] == 0).all()

    # An image depends only on its seed (not on batch size or neighbours); --class fixes the label.
    result = run("--teacher", COND, "--seeds", "3", "--out", str(tmp_path / "b"), "--steps", "2",
                 "--device", "cpu", "--class", str(labels[3]))
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "b" / "samples.npz") as f:
        assert np.array_equal(f["x"][0], x[3]) and f["labels"].tolist() == [labels[3]]


def test_unconditional_teacher(tmp_path):
    result = run("--teacher", UNCOND, "--seeds", "7,9", "--out", str(tmp_path), "--steps", "2",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "samples.npz") as f:
        assert f["x"].shape == (2, 16, 16, 3) and "labels" not in f.files


@pytest.mark.parametrize("args,message", [
    (["--teacher", COND, "--class", "10"], "--class 10 is out of range; this teacher has classes 0 to 9"),
    (["--teacher", UNCOND, "--class", "1"], "teacher is unconditional"),
    (["--teacher", COND, "--seeds", "1,x"], "cannot read 'x'"),
    (["--teacher", COND, "--seeds", "9-2"], "runs backwards"),
    (["--teacher", str(DATA / "sg2ada-small-uncond.pkl")], "use it as --generator"),
])
def test_bad_input_is_one_line_error(tmp_path, args, message):
    out = tmp_path / "out"
    result = run(*args, "--out", str(out), "--steps", "2", "--device", "cpu")
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "samples.npz").write_bytes(b"mine")
    result = run("--teacher", COND, "--out", str(tmp_path), "--seeds", "0", "--steps", "2", "--device", "cpu")
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "samples.npz").read_bytes() == b"mine" and not (tmp_path / "grid.png").exists()


def test_a_failed_grid_leaves_neither_file(tmp_path, monkeypatch):
    """The grid is written after the .npz; when it fails (here the disk is full), the .npz goes too, so a
    rerun into the same folder is not refused for a half-written output."""
    import errno

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", disk_full)
    result = run("--teacher", COND, "--out", str(tmp_path / "s"), "--seeds", "0", "--steps", "2", "--device", "cpu")
    assert result.exit_code == 2 and "no space left on device while writing" in result.output, result.output
    assert list((tmp_path / "s").iterdir()) == []
    monkeypatch.undo()
    again = run("--teacher", COND, "--out", str(tmp_path / "s"), "--seeds", "0", "--steps", "2", "--device", "cpu")
    assert again.exit_code == 0, again.output


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 1,10-11") == [5, 1, 10, 11]
    with pytest.raises(UserError):
        parse_seeds("")


def test_quantisation():
    """(x·127.5 + 128) clamped to [0, 255], truncated to uint8 (NVIDIA's image convention)."""
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 7)
    assert to_uint8(x).ravel().tolist() == [0, 0, 64, 128, 255, 255, 255]


@pytest.mark.parametrize("command", ["sample", "metrics", "refine", "distill"])
def test_threads_sets_torchs_cpu_threads(command, tmp_path):
    """--threads N is applied as the options are read (here the commands then stop at a missing input)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = {"sample": ["--teacher", str(tmp_path / "missing.pkl"), "--out", str(tmp_path / "s")],
                "metrics": ["--images", str(tmp_path), "--metrics", "is"],
                "refine": ["--generator", "g.pkl", "--teacher", "t.pkl", "--out", str(tmp_path / "r")],
                "distill": ["--teacher", str(tmp_path / "missing.pkl"), "--out", str(tmp_path / "d")]}[command]
        result = CliRunner().invoke(cli, [command, *args, "--threads", "1"])
        assert result.exit_code == 2 and torch.get_num_threads() == 1, result.output
    finally:
        torch.set_num_threads(before)
