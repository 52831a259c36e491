"""--batch-gpu: each process runs its batch through the networks in chunks and sums their gradients before one
update, so a run gives the whole batch's update (to float rounding) with at most --batch-gpu images per network
call; checked against Algorithm 1 written out in tests/test_iteration.py, against whole-batch runs of the
adversarial, augmented and EDM runs, and under two processes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from common.errors import UserError
from fileformats import nvpickle
from refiner.cli import cli
from refiner.config import resolve_config
from refiner.toy import run_toy
from tests.helpers import assert_same
from tests.test_adversarial_loop import TOY
from tests.test_distributed import _assert_same_training_state, _one_process, _state, _two_processes
from tests.test_iteration import CONFIG, _assert_close, _plain, _trainer
from tests.test_refine import SG2, _refine, teacher32  # noqa: F401  (teacher32: a fixture)


def _largest_call(trainer) -> list[int]:
    """Hooks that record the largest batch any of the three networks is called with."""
    largest = [0]

    def hook(module, args):
        largest[0] = max(largest[0], args[0].shape[0])

    for network in (trainer.generator, trainer.teacher, trainer.fake):
        network.register_forward_pre_hook(hook)
    return largest


@pytest.mark.parametrize("loss, reuse_pass", [("ikl", False), ("sid", False), ("ikl", True), ("sid", True)])
def test_chunks_give_algorithm_1s_whole_batch_update(tmp_path: Path, loss: str, reuse_pass: bool):
    config = replace(CONFIG, loss=loss, reuse_pass=reuse_pass)
    trainer = _trainer(tmp_path, replace(config, batch_gpu=4))  # batch 16: four chunks
    largest = _largest_call(trainer)
    for _ in range(4):
        trainer.iteration()
    assert largest[0] == 4
    assert trainer.counters.fake_steps == trainer.counters.step == 4
    _assert_close(trainer, _plain(config, 4), atol=1e-6 if loss == "ikl" else 1e-5)


def test_logged_statistics_are_the_whole_batchs(tmp_path: Path):
    whole, chunked = (_trainer(tmp_path / str(b), replace(CONFIG, reuse_pass=True, batch_gpu=b)) for b in (None, 2))
    a, b = whole.iteration()[-1], chunked.iteration()[-1]
    assert a.keys() == b.keys() and {"loss_gen", "loss_fake", "grad_norm_gen", "grad_norm_fake"} <= set(a)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("given", [{"loss": "ikl"}, {"loss": "dmd"}, {"loss": "sid"}, {"loss": "sim"}, {"loss": "uni"},
                                   {"loss": "dmd2"}, {"reuse_images": True}])
def test_every_loss_in_chunks_gives_the_whole_batch_update(tmp_path: Path, given: dict):
    """Every loss that is a mean of per-sample terms (dmd2's discriminator with real data and per-chunk draws too)
    and --reuse-images (the chunks' images put back together), on the toy ring: batch 64 in chunks of 16."""
    a, b = _whole_and_chunked(tmp_path, given)
    # Adam (lr 2e-3) divides near-zero gradients of the head's GroupNorm on a 1x1 map by their rounding-level size:
    # up to 1.7e-5 apart after 15 head steps; a chunk lost or counted twice moves a weight by ~lr per step
    for net in ("generator", "fake", "ema", *(["adversary"] if "adversary" in a else [])):
        for key, value in a[net].items():
            torch.testing.assert_close(b[net][key], value, rtol=1e-4, atol=5e-5, msg=f"{net}.{key}")
    assert ("adversary" in a) == (given.get("loss") == "dmd2")


@pytest.mark.parametrize("given", [{"loss": "uni", "divergence": "js"}, {"loss": "sida"}])
def test_losses_with_batch_means_run_in_chunks(tmp_path: Path, given: dict):
    """uni with a density ratio (self-normalised weights) and sida (products of batch means) take their means per
    chunk, as per process under data parallelism: a different update, so only that it trains is checked here."""
    a, b = _whole_and_chunked(tmp_path, given)
    assert all(torch.isfinite(v).all() for v in b["generator"].values())
    assert any(not torch.equal(b["generator"][k], v) for k, v in a["generator"].items())


def _whole_and_chunked(tmp_path: Path, given: dict) -> tuple[dict, dict]:
    """Training states after 3 toy steps with the whole batch of 64 and in chunks of 16."""
    config = resolve_config(TOY, {"steps": 3, **given})
    run_toy(config, tmp_path / "whole", samples=32)
    run_toy(replace(config, batch_gpu=16), tmp_path / "chunked", samples=32)
    a, b = _state(tmp_path / "whole", 3), _state(tmp_path / "chunked", 3)
    assert a["counters"] == b["counters"] and b["counters"]["skipped_generator"] == 0
    return a, b


def test_an_edm_distillation_with_augmentation_in_chunks_follows_the_whole_batch(tmp_path: Path):
    _one_process(tmp_path / "whole", "--steps", "2", "--augment", "0.5")
    _one_process(tmp_path / "chunked", "--steps", "2", "--augment", "0.5", "--batch-gpu", "1")
    _assert_same_training_state(_state(tmp_path / "whole", 2), _state(tmp_path / "chunked", 2))
    assert json.loads((tmp_path / "chunked" / "config.json").read_text())["batch_gpu"] == 1


def test_two_processes_in_chunks_follow_one_process(tmp_path: Path):
    """Each process sums its chunks' gradients and averages the sum over processes once, in the last chunk."""
    _one_process(tmp_path / "one", "--steps", "2", "--reuse-pass")
    _two_processes(tmp_path / "two", "--steps", "2", "--reuse-pass", "--batch-gpu", "1")  # 4 over 2: 2 chunks of 1
    _assert_same_training_state(_state(tmp_path / "one", 2), _state(tmp_path / "two", 2))


def test_a_run_resumes_under_another_batch_gpu(tmp_path: Path):
    config = replace(TOY, steps=4, snapshot_every=2)
    run_toy(config, tmp_path / "straight", samples=32)
    run_toy(replace(config, steps=2), tmp_path / "resumed", samples=32)
    run_toy(replace(config, batch_gpu=8), tmp_path / "resumed", samples=32, resume=True)
    a, b = _state(tmp_path / "straight", 4), _state(tmp_path / "resumed", 4)
    assert a["counters"] == b["counters"]
    for key, value in a["generator"].items():
        torch.testing.assert_close(b["generator"][key], value, rtol=1e-4, atol=1e-6)
    assert_same(a["rng"], b["rng"])


def test_a_batch_gpu_that_does_not_divide_the_batch_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match=r"--batch-gpu 5 must divide the batch of each process, 16 .*divisor of 16"):
        _trainer(tmp_path, replace(CONFIG, batch_gpu=5))
    with pytest.raises(UserError, match="--batch-gpu must be >= 1"):
        replace(CONFIG, batch_gpu=0).validate()
    trainer = _trainer(tmp_path / "larger", replace(CONFIG, batch_gpu=64))  # more than the batch: one chunk
    assert trainer.chunks == [slice(0, 16)]


def test_the_cli_takes_and_explains_batch_gpu(tmp_path: Path):
    result = CliRunner().invoke(cli, ["toy", "--out", str(tmp_path / "run"), "--steps", "1", "--batch", "8",
                                      "--samples", "50", "--batch-gpu", "3"])
    assert result.exit_code == 2 and "--batch-gpu 3 must divide the batch of each process, 8" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    for command in ("toy", "refine", "distill"):
        assert "--batch-gpu" in CliRunner().invoke(cli, [command, "--help"]).output, command


def test_refine_a_stylegan2_pickle_in_chunks(tmp_path: Path, teacher32: Path):  # noqa: F811
    """StyleGAN2 draws its per-pixel noise per call, so chunks change those draws: the run is checked to train
    the same weights by about the same amount as the whole batch, one image per network call."""
    moves = {}
    for name, extra in (("whole", []), ("chunked", ["--batch-gpu", "1"])):
        out = tmp_path / name
        result = _refine("--generator", str(SG2), "--teacher", str(teacher32), "--out", str(out), "--lr", "1e-3",
                         *extra)
        assert result.exit_code == 0, result.output
        before, after = (nvpickle.load(p)["G_ema"].state_dict() for p in (SG2, out / "network-refined.pkl"))
        moves[name] = torch.cat([(after[k] - before[k]).flatten() for k in before])
    assert json.loads((tmp_path / "chunked" / "config.json").read_text())["batch_gpu"] == 1
    whole, chunked = moves["whole"], moves["chunked"]
    # the same update but for the noise draws: the moves point the same way and are as long
    assert float(torch.nn.functional.cosine_similarity(whole, chunked, dim=0)) > 0.9
    assert 0.8 < float(chunked.norm() / whole.norm()) < 1.25
