"""`refiner refine` on the small fixtures: StyleGAN2-ADA (golden) + a 32x32 EDM teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fileformats import nvpickle
from refiner.cli import cli
from tests.helpers import DATA, write_edm_teacher

SG2 = DATA / "sg2ada-small-uncond.pkl"


@pytest.fixture(scope="module")
def teacher32(tmp_path_factory) -> Path:
    return write_edm_teacher(tmp_path_factory.mktemp("t") / "edm32.pkl")


def _refine(*args: str):
    return CliRunner().invoke(cli, ["refine", "--steps", "3", "--batch", "4", "--log-every", "1",
                                    "--device", "cpu", *args], catch_exceptions=False)


def _tensors(record) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.state_dict().items()}


def test_refine_changes_g_ema_keeps_everything_else_and_resumes(tmp_path: Path, teacher32: Path):
    gen = tmp_path / "sg2.pkl"
    shutil.copy(SG2, gen)
    original_bytes = gen.read_bytes()
    out = tmp_path / "run"
    result = _refine("--generator", str(gen), "--teacher", str(teacher32), "--out", str(out),
                     "--lr", "1e-3", "--snapshot-every", "2")
    assert result.exit_code == 0, result.output
    assert gen.read_bytes() == original_bytes  # the input is never modified
    refined = out / "network-refined.pkl"
    before, after = nvpickle.load(SG2), nvpickle.load(refined)
    g_before, g_after = _tensors(before["G_ema"]), _tensors(after["G_ema"])
    changed = [k for k in g_before if not torch.equal(g_before[k], g_after[k])]
    assert any("synthesis" in k for k in changed) and any("mapping" in k for k in changed)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(before["D"]).values(), _tensors(after["D"]).values()))
    assert after["training_set_kwargs"] == before["training_set_kwargs"]
    assert nvpickle.globals_in(refined) == nvpickle.globals_in(SG2)
    for name in ("grid-before.png", "grid-after.png", "report.html", "report.json", "log.jsonl"):
        assert (out / name).exists(), name
    # resume for more steps continues from step 3
    more = _refine("--generator", str(gen), "--teacher", str(teacher32), "--out", str(out),
                   "--lr", "1e-3", "--snapshot-every", "2", "--resume", "--steps", "5")
    assert more.exit_code == 0, more.output
    assert json.loads(more.output.strip().splitlines()[-1])["steps"] == 5
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_in_place_keeps_a_backup(tmp_path: Path, teacher32: Path):
    gen = tmp_path / "sg2.pkl"
    shutil.copy(SG2, gen)
    result = _refine("--generator", str(gen), "--teacher", str(teacher32), "--out", str(tmp_path / "r"),
                     "--steps", "1", "--in-place", "--keep-G", "--trainable", "synthesis")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sg2.pkl.bak").read_bytes() == SG2.read_bytes()
    assert gen.read_bytes() == (tmp_path / "r" / "network-refined.pkl").read_bytes()
    new, old = nvpickle.load(gen), nvpickle.load(SG2)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(new["G"]).values(), _tensors(old["G"]).values()))
    mapping = [k for k in _tensors(old["G_ema"]) if k.startswith("mapping.")]
    assert all(torch.equal(_tensors(new["G_ema"])[k], _tensors(old["G_ema"])[k]) for k in mapping)


@pytest.mark.parametrize("teacher_kw, needle", [
    (dict(resolution=16), "resolution: generator 32x32, teacher 16x16"),
    (dict(label_dim=10), "labels: generator unconditional, teacher conditional with 10 classes"),
    (dict(channels=1), "channels: generator 3, teacher 1"),
])
def test_mismatched_teacher_is_refused_before_any_compute(tmp_path: Path, teacher_kw, needle):
    teacher = write_edm_teacher(tmp_path / "t.pkl", **teacher_kw)
    out = tmp_path / "run"
    result = _refine("--generator", str(SG2), "--teacher", str(teacher), "--out", str(out))
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not out.exists()


def test_wrong_kind_of_generator_file(tmp_path: Path, teacher32: Path):
    d_only = tmp_path / "d.pkl"
    data = nvpickle.load(SG2)
    nvpickle.dump({"D": data["D"]}, d_only)
    for gen in (d_only, teacher32):
        result = _refine("--generator", str(gen), "--teacher", str(teacher32), "--out", str(tmp_path / "r"))
        assert result.exit_code == 2 and "G_ema" in result.output, result.output
        assert not (tmp_path / "r").exists()
    swapped = _refine("--generator", str(SG2), "--teacher", str(SG2), "--out", str(tmp_path / "r"))
    assert swapped.exit_code == 2 and "StyleGAN2-ADA snapshot" in swapped.output


def test_refine_biggan_folder_through_the_resolution_bridge(tmp_path: Path):
    from gan_adapters.biggan import load_biggan

    teacher = write_edm_teacher(tmp_path / "t16.pkl", resolution=16, label_dim=10)
    folder = DATA / "biggan-deep-small"
    out = tmp_path / "run"
    refused = _refine("--generator", str(folder), "--teacher", str(teacher), "--out", str(out))
    assert refused.exit_code == 2 and "--resize-to-teacher" in refused.output and not out.exists()
    result = _refine("--generator", str(folder), "--teacher", str(teacher), "--out", str(out), "--steps", "2",
                     "--lr", "1e-3", "--resize-to-teacher", "--truncation", "0.5")
    assert result.exit_code == 0, result.output
    refined = out / "biggan-refined"
    assert (refined / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    old, new = load_biggan(folder).network.state_dict(), load_biggan(refined).network.state_dict()
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[k], new[k]) for k in old)
