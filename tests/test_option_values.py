"""Option values are checked when the command line is parsed (finite numbers, ranges that fit memory, a
device this machine has, sha256 digits), and a run that diverges stops instead of writing broken weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from common.errors import UserError
from gan_adapters.mlp import MLPGenerator
from refiner.cli import cli
from refiner.cli.sample import check_memory, parse_seeds
from refiner.config import TrainConfig
from refiner.loop import MAX_NONFINITE_STEPS, Trainer
from refiner.rundir import RunDir
from teachers.analytic import ring
from teachers.mlp import MLPDenoiser
from tests.helpers import write_edm_teacher

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a build or machine without CUDA")


def _run(args: list[str]):
    result = CliRunner().invoke(cli, args)
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("args, needle", [
    (["toy", "--lr", "inf"], "Invalid value for '--lr': 'inf' is not a finite number"),
    (["toy", "--p-mean", "nan"], "Invalid value for '--p-mean': 'nan' is not a finite number"),
    (["toy", "--fake-lr", "-inf"], "'--fake-lr': '-inf' is not a finite number"),
    (["toy", "--ema", "1e400"], "'--ema': '1e400' is not a finite number"),
    (["distill", "--teacher", "t.pkl", "--kimg", "nan"], "'--kimg': 'nan' is not a finite number"),
    (["distill", "--teacher", "t.pkl", "--sigma-init", "inf"], "'--sigma-init': 'inf' is not a finite number"),
    (["refine", "--generator", "g.pkl", "--teacher", "t.pkl", "--truncation", "nan"],
     "'--truncation': 'nan' is not a finite number"),
    (["demo", "--lr", "nan"], "'--lr': 'nan' is not a finite number"),
    (["toy", "--lr", "1e39"], "--lr must be in (0, 1] (got 1e+39)"),
    (["toy", "--fake-lr", "0"], "--fake-lr must be in (0, 1] (got 0.0)"),
    (["toy", "--seed", str(2**64)], f"'--seed': {2**64} is not in the range 0<=x<={2**63 - 1}"),
    (["toy", "--seed", "-1"], "'--seed': -1 is not in the range 0<="),
    (["toy", "--batch", "1000000000"], "'--batch': 1000000000 is not in the range 1<=x<=65536"),
    (["metrics", "--images", ".", "--seed", str(2**70)], "'--seed'"),
    (["metrics", "--images", ".", "--batch", str(2**40)], "'--batch'"),
    (["sample", "--teacher", "t.pkl", "--batch", str(2**40)], "'--batch'"),
    (["distill", "--teacher", "t.pkl", "--grid-seeds", "100000000"], "'--grid-seeds': 100000000 is not in"),
    (["refine", "--generator", "g.pkl", "--teacher", "t.pkl", "--teacher-sha256", "abc"],
     "'--teacher-sha256': --teacher-sha256 'abc' is not a sha256: give its 64 hexadecimal digits"),
    (["metrics", "--images", ".", "--detector-sha256", "z" * 64], "is not a sha256"),
])
def test_bad_values_are_refused_when_parsed(tmp_path: Path, args: list[str], needle: str):
    out = tmp_path / "run"
    if args[0] not in ("metrics",):
        args = [*args, "--out", str(out)]
    result = _run(args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not out.exists()


@NO_CUDA
@pytest.mark.parametrize("args", [
    ["toy", "--device", "cuda"],
    ["metrics", "--images", ".", "--device", "cuda"],
    ["sample", "--teacher", "t.pkl", "--device", "cuda:1"],
    ["demo", "--device", "cuda"],
])
def test_cuda_on_a_machine_without_it(tmp_path: Path, args: list[str]):
    result = _run([*args, "--out", str(tmp_path / "run")] if args[0] != "metrics" else args)
    assert result.exit_code == 2
    assert "CUDA is not available; use --device cpu or auto" in result.output


def test_seeds_are_bounded_before_they_are_expanded():
    assert parse_seeds("0-2,7,4294967295") == [0, 1, 2, 7, 2**32 - 1]
    with pytest.raises(UserError, match=r"asks for 4,000,000,000 images; one call draws at most 1,000,000"):
        parse_seeds("0-3999999999")
    with pytest.raises(UserError, match=r"4294967296 is over the largest seed 4294967295"):
        parse_seeds("4294967296")
    with pytest.raises(UserError, match=r"asks for 1,000,001 images"):
        parse_seeds("0-499999,1000000-1500000")


def test_sample_refuses_more_images_than_memory_holds(tmp_path: Path):
    check_memory(64, (3, 32, 32))
    with pytest.raises(UserError, match=r"asks for 1,000,000 images of 3x4096x4096: about 93750\.0 GiB in memory, "
                                        r"more than the .* GiB available; draw at most [\d,]+ per call"):
        check_memory(1_000_000, (3, 4096, 4096))


def test_teacher_sha256_is_checked_before_the_file_is_used(tmp_path: Path):
    teacher = write_edm_teacher(tmp_path / "edm.pkl")
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
    args = ["sample", "--teacher", str(teacher), "--seeds", "0", "--steps", "2", "--device", "cpu"]
    bad = _run([*args, "--teacher-sha256", "0" * 64, "--out", str(tmp_path / "a")])
    assert bad.exit_code == 2 and f"checksum mismatch for {teacher}: expected sha256 {'0' * 64}, got {digest}" \
        in bad.output
    assert not (tmp_path / "a").exists()
    good = _run([*args, "--teacher-sha256", digest.upper(), "--out", str(tmp_path / "b")])
    assert good.exit_code == 0, good.output
    assert (tmp_path / "b" / "samples.npz").exists()


# -- a diverging run ---------------------------------------------------------------------------------

def _trainer(tmp_path: Path, **config) -> tuple[Trainer, RunDir]:
    cfg = TrainConfig(**{"steps": 40, "batch": 16, "lr": 1e-3, "fake_lr": 1e-3, "log_every": 1, "device": "cpu",
                         **config})
    run = RunDir(tmp_path / "run")
    run.prepare(cfg)
    return Trainer(cfg, MLPGenerator(), ring(), MLPDenoiser(sigma_data=0.7), run, torch.device("cpu"),
                   echo=lambda s: None), run


def _diverge_at_first_update(trainer: Trainer) -> None:
    """The first generator update leaves an infinite weight, as a too large step does."""
    step = trainer.opt_g.step

    def broken(*args, **kwargs):
        result = step(*args, **kwargs)
        if trainer.counters.step == 0:
            with torch.no_grad():
                next(trainer.generator.parameters()).view(-1)[0] = float("inf")
        return result

    trainer.opt_g.step = broken


def test_a_diverged_run_stops_after_n_skipped_steps(tmp_path: Path):
    # After the broken update every gradient is non-finite (and skipped); the run stops N steps later.
    trainer, run = _trainer(tmp_path)
    _diverge_at_first_update(trainer)
    with pytest.raises(UserError, match=rf"training stopped at step {MAX_NONFINITE_STEPS + 1}: the generator's "
                                        rf"gradient was non-finite for {MAX_NONFINITE_STEPS} steps in a row"):
        trainer.train()
    assert trainer.counters.skipped_generator == MAX_NONFINITE_STEPS
    assert run.checkpoints() == []


def test_non_finite_weights_are_never_written(tmp_path: Path):
    trainer, run = _trainer(tmp_path, snapshot_every=2)
    _diverge_at_first_update(trainer)
    with pytest.raises(UserError, match=r"training stopped at step 2: the generator weights are no longer finite, "
                                        r"so no snapshot was written"):
        trainer.train()
    assert list(run.checkpoint_dir.iterdir()) == []


def test_a_few_skipped_steps_do_not_stop_a_run(tmp_path: Path):
    trainer, _ = _trainer(tmp_path, lr=1e-3, steps=12)
    calls = {"n": 0}
    teacher = trainer.teacher

    def flaky(x, sigma, labels=None):  # non-finite in generator steps 2 to 10 (9 in a row), then fine again
        calls["n"] += 1
        out = teacher(x, sigma, labels)
        return out * float("nan") if 2 <= calls["n"] <= MAX_NONFINITE_STEPS else out

    trainer.teacher = flaky
    counters = trainer.train()
    assert counters.step == 12 and counters.skipped_generator == MAX_NONFINITE_STEPS - 1
