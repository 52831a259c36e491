"""The public Python API, imported and used exactly as the README's example does, on the test fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import DATA, write_edm_teacher


def test_readme_example_refines_writes_back_and_measures(tmp_path: Path):
    import refiner
    from gan_adapters import load_generator
    from metrics import compute_metrics
    from teachers import load_teacher

    teacher = load_teacher(write_edm_teacher(tmp_path / "teacher.pkl", resolution=32))  # 32 px, like the GAN
    generator = load_generator(DATA / "sg2ada-small-uncond.pkl")
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    refined = refiner.train(generator, teacher, tmp_path / "run", steps=2, batch=2, lr=1e-3, fake_lr=1e-3,
                            device="cpu", echo=lambda s: None)
    assert any(not torch.equal(before[k], v) for k, v in refined.state_dict().items())
    refined.save(tmp_path / "network-refined.pkl", overwrite=True)
    reloaded = load_generator(tmp_path / "network-refined.pkl")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), refined.state_dict().values()))
    assert (tmp_path / "run" / "network-refined.pkl").is_file() and (tmp_path / "run" / "report.html").is_file()

    # FID (stand-in detector: no download) of the refined generator against its own samples at the same seeds
    # is 0; against the generator before refinement it is not
    from metrics.evaluate import generated_batches
    from tests.metrics_helpers import StandInDetector

    def npz(G, path: Path) -> Path:
        images = torch.cat(list(generated_batches(G, 32, batch_size=64, seed=0)))  # as compute_metrics draws
        np.savez(path, x=images.permute(0, 2, 3, 1).numpy())
        return path

    same = compute_metrics(refined, StandInDetector(), "fid32", ref=npz(refined, tmp_path / "same.npz"))
    original = load_generator(DATA / "sg2ada-small-uncond.pkl")
    other = compute_metrics(refined, StandInDetector(), "fid32", ref=npz(original, tmp_path / "before.npz"))
    assert abs(same["fid"]) < 1e-6 < 0.1 < other["fid"]


def test_unknown_option_is_refused(tmp_path: Path):
    import refiner
    from common.errors import UserError

    with pytest.raises(UserError, match="unknown options \\['stepz'\\]"):
        refiner.train(None, None, tmp_path, stepz=3)


def test_networks_are_checked_and_data_feeds_the_discriminator_losses(tmp_path: Path):
    """A path where a loaded network belongs names the loader; swapped networks are named as such; `data`
    gives dmd2 its real images (the command line's --data), and dmd2 without it is refused before any work."""
    import refiner
    from common.errors import UserError
    from gan_adapters import load_generator
    from teachers import load_teacher
    from tests.metrics_helpers import random_images, write_folder

    teacher_path = write_edm_teacher(tmp_path / "teacher.pkl", resolution=32)
    teacher, generator = load_teacher(teacher_path), load_generator(DATA / "sg2ada-small-uncond.pkl")
    for args, message in [((DATA / "sg2ada-small-uncond.pkl", teacher), r"generator is a path .*load it first with "
                                                                         r"gan_adapters.load_generator\(path\)"),
                          ((generator, str(teacher_path)), r"teacher is a path .*teachers.load_teacher\(path\)"),
                          ((teacher, generator), "the generator and the teacher are in each other's place"),
                          ((generator, 3), "teacher is a int, not a teacher network")]:
        with pytest.raises(UserError, match=message):
            refiner.train(*args, tmp_path / "run", steps=1, batch=2, device="cpu")
    with pytest.raises(UserError, match="--loss dmd2 trains a discriminator on real images: give them with --data"):
        refiner.train(generator, teacher, tmp_path / "run", steps=1, batch=2, device="cpu", loss="dmd2")
    assert not (tmp_path / "run").exists()

    data = write_folder(tmp_path / "real", random_images(8, seed=3, size=32))
    refined = refiner.train(generator, teacher, tmp_path / "run", steps=1, batch=2, device="cpu", loss="dmd2",
                            data=data, echo=lambda s: None)
    assert all(torch.isfinite(p).all() for p in refined.parameters())
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss_disc", "d_real", "d_fake"} <= set(record)  # the discriminator saw the real images
