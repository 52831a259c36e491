"""gan_adapters/writeback.py: each format's output name, its writer, and the --in-place checks that the
refine runs in test_refine.py / test_runs.py do not reach (their refusals)."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from fileformats import nvpickle
from gan_adapters.loader import load_generator
from gan_adapters.resize import Resized
from gan_adapters.writeback import in_place_backup, replace_input, writeback_for
from tests.helpers import DATA, seeded_state_dict

SG2 = DATA / "sg2ada-small-uncond.pkl"
SG3 = DATA / "sg3-t-uncond.pkl"
BIGGAN = DATA / "biggan-deep-small"
EDM16 = DATA / "edm-small-ddpmpp-edm-cond.pkl"


def _onestep(tmp_path: Path, *extra: str) -> Path:
    """A Diff-Instruct-style snapshot ({'ema': EDM network}, plus `extra` entries)."""
    record = nvpickle.load(EDM16)["ema"]
    path = tmp_path / f"onestep{''.join('-' + k for k in extra)}.pkl"
    nvpickle.dump({"ema": record, **{k: record for k in extra}}, path)
    return path


@pytest.mark.parametrize("source, options, refined, snapshot", [
    (SG2, {}, "network-refined.pkl", "network-snapshot-000000002.pkl"),
    (SG3, {}, "network-refined.pkl", "network-snapshot-000000002.pkl"),
    (BIGGAN, {}, "biggan-refined", "biggan-snapshot-000000002"),
    (None, {"sigma_init": 1.0}, "network-refined.pkl", "network-snapshot-000000002.pkl"),
])
def test_each_format_names_its_outputs_as_refine_and_distill_did(tmp_path, source, options, refined, snapshot):
    generator = load_generator(source or _onestep(tmp_path), **options)
    out = tmp_path / "run"
    assert writeback_for(generator).path(out, 2) == writeback_for(generator).path(out, 4) == out / refined
    assert writeback_for(generator, snapshots=True).path(out, 2) == out / snapshot
    if generator.data_shape[-1] % 2 == 0:  # a resized generator is written in the wrapped one's format
        assert writeback_for(Resized(generator, generator.data_shape[-1] // 2)).path(out, 2) == out / refined


def test_the_stylegan2_writer_keeps_everything_else_and_G_with_keep_G(tmp_path):
    generator = load_generator(SG2)
    writeback_for(generator, keep_G=True).save(generator, tmp_path / "same.pkl")
    assert (tmp_path / "same.pkl").read_bytes() == SG2.read_bytes()  # unchanged weights: the input, byte for byte
    with torch.no_grad():
        generator.network.synthesis.b4.conv1.weight.add_(1.0)
    refined = generator.network.state_dict()
    for keep_G in (False, True):
        path = tmp_path / f"keep-{keep_G}.pkl"
        writeback_for(Resized(generator, 16), keep_G=keep_G).save(Resized(generator, 16), path)
        written, original = nvpickle.load(path), nvpickle.load(SG2)
        assert all(torch.equal(v, refined[k]) for k, v in written["G_ema"].state_dict().items())
        expected_G = original["G"] if keep_G else written["G_ema"]
        assert all(torch.equal(v, expected_G.state_dict()[k]) for k, v in written["G"].state_dict().items())
        assert all(torch.equal(v, original["D"].state_dict()[k]) for k, v in written["D"].state_dict().items())


def test_keep_G_is_refused_for_other_formats(tmp_path):
    with pytest.raises(UserError, match="--keep-G applies to StyleGAN2-ADA pickles"):
        writeback_for(load_generator(BIGGAN), keep_G=True)


def test_in_place_backup_refuses_what_it_cannot_replace(tmp_path, monkeypatch):
    target = tmp_path / "sg2.pkl"
    for source in ("https://example.com/sg2.pkl", str(target)):
        with pytest.raises(UserError, match="--in-place needs a local generator file or folder"):
            in_place_backup(source)
    shutil.copy(SG2, target)
    assert in_place_backup(str(target)) == tmp_path / "sg2.pkl.bak"
    (tmp_path / "sg2.pkl.bak").write_bytes(b"an earlier backup")
    with pytest.raises(UserError, match=r"would keep the input as .*sg2\.pkl\.bak, which already exists"):
        in_place_backup(str(target))
    (tmp_path / "sg2.pkl.bak").unlink()
    (tmp_path / "link.pkl").symlink_to(target)
    with pytest.raises(UserError, match=r"would replace .*link\.pkl, a symbolic link to .*sg2\.pkl, by a file"):
        in_place_backup(str(tmp_path / "link.pkl"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == str(tmp_path) else real_access(path, mode))
    with pytest.raises(UserError, match=rf"writes .*sg2\.pkl\.bak and the refined generator into {tmp_path}, which "
                                        "this user cannot write"):
        in_place_backup(str(target))  # before any training, not when the backup is written
    monkeypatch.setattr(os, "access", real_access)
    size = target.stat().st_size
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(0, 0, 2 * size - 1))
    with pytest.raises(UserError, match=f"needs {2 * size:,} bytes free beside .* only {2 * size - 1:,} bytes are"):
        in_place_backup(str(target))


def test_a_onestep_generator_in_place_only_over_a_pickle_it_writes_whole(tmp_path):
    ref = torch.load(DATA / "dmd2-small.ref.pt")
    torch.save(seeded_state_dict(ref), tmp_path / "dmd2.bin")
    for source, message in ((tmp_path / "dmd2.bin", "would replace .*dmd2.bin \\(a torch state dict\\) with a "
                                                    "network pickle"),
                            (_onestep(tmp_path, "Sg"), "would drop Sg from")):
        writer = writeback_for(load_generator(source, sigma_init=1.0))
        with pytest.raises(UserError, match=message):
            writer.check_in_place(str(source))
    plain = _onestep(tmp_path)
    writeback_for(load_generator(plain, sigma_init=1.0)).check_in_place(str(plain))
    writeback_for(load_generator(SG2)).check_in_place(str(SG2))  # a StyleGAN2 pickle keeps everything


def test_replace_input_refuses_an_output_that_does_not_read_back(tmp_path):
    target, refined = tmp_path / "sg2.pkl", tmp_path / "out" / "network-refined.pkl"
    shutil.copy(SG2, target)
    refined.parent.mkdir()
    shutil.copy(SG2, refined)
    reference = load_generator(SG2)
    with torch.no_grad():
        reference.network.mapping.fc0.weight.mul_(2.0)
    with pytest.raises(UserError, match="did not read back as the refined generator; .*sg2.pkl was left unchanged"):
        replace_input(target, refined, tmp_path / "sg2.pkl.bak", reference, {})
    assert target.read_bytes() == SG2.read_bytes() and not (tmp_path / "sg2.pkl.bak").exists()

