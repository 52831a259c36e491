"""Runs as a user sees them: the same command twice gives the same bytes, a resumed run equals an
uninterrupted one, --force deletes only what runs wrote, a live run is locked, a changed teacher is
noticed on resume, --in-place with every option, unique snapshot names, EDM's EMA β, --sigma-init."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fileformats.atomic as atomic
import refiner.cli.metrics as cli_metrics
import refiner.loop as loop
from common.errors import UserError
from fileformats import nvpickle
from gan_adapters.loader import load_generator
from gan_adapters.onestep import OneStepGenerator
from gan_adapters.writeback import replace_input
from refiner.cli import cli
from refiner.cli.sample import to_uint8
from refiner.config import TrainConfig
from refiner.rundir import LOCK, MARKER, RunDir
from teachers.edm_loader import build_network, network_record
from teachers.edm_precond import EDMPrecond
from teachers.sampler import SeededNoise
from tests.helpers import DATA, assert_same, small_edm_kwargs, write_edm_teacher

SG2 = DATA / "sg2ada-small-uncond.pkl"  # 32x32, unconditional
EDM16 = DATA / "edm-small-ddpmpp-edm-cond.pkl"  # 16x16, 10 classes, dropout 0.13
BIGGAN = DATA / "biggan-deep-small"  # 32x32, 10 classes


@pytest.fixture(scope="module")
def teacher32(tmp_path_factory) -> Path:
    return write_edm_teacher(tmp_path_factory.mktemp("t") / "edm32.pkl")


def _cli(*args: str, seed_before: int = 0):
    """Invoke the CLI after moving torch's global generator somewhere else (as a new process would,
    torch 2.13 seeds it randomly): outputs must not depend on it."""
    torch.manual_seed(seed_before)
    return CliRunner().invoke(cli, list(args))


def _refine(gen: Path, teacher: Path, out: Path, *args: str, seed_before: int = 0):
    return _cli("refine", "--generator", str(gen), "--teacher", str(teacher), "--out", str(out), "--batch", "2",
                "--device", "cpu", "--lr", "1e-3", "--log-every", "1", *args, seed_before=seed_before)


def _distill(out: Path, *args: str, teacher: Path = EDM16, seed_before: int = 0):
    return _cli("distill", "--teacher", str(teacher), "--out", str(out), "--preset", "cifar10-cond", "--batch", "2",
                "--device", "cpu", "--grid-seeds", "2", "--lr", "1e-3", "--fake-lr", "1e-3", "--log-every", "1",
                *args, seed_before=seed_before)


def _files(out: Path, pattern: str) -> dict[str, str]:
    """name -> sha256 of each matching file (digests keep a failing comparison's report short)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob(pattern))}


def _final_state(out: Path) -> dict:
    return torch.load(RunDir(out).latest_checkpoint(), weights_only=True)



# -- determinism ------------------------------------------------------------------------------------

def test_toy_same_seed_twice_is_byte_identical(tmp_path: Path):
    args = ("toy", "--steps", "3", "--batch", "16", "--samples", "50", "--fake-warmup", "1", "--device", "cpu")
    runs = [tmp_path / "a", tmp_path / "b"]
    for i, out in enumerate(runs):
        assert _cli(*args, "--out", str(out), seed_before=i).exit_code == 0
    assert _files(runs[0], "toy.*") == _files(runs[1], "toy.*")
    assert_same(_final_state(runs[0]), _final_state(runs[1]))


def test_refine_same_seed_twice_and_resume_equal_an_uninterrupted_run(tmp_path: Path, teacher32: Path):
    """StyleGAN2's per-pixel noise (noise mode random) draws from torch's global generator: seeded per run,
    recorded in the checkpoint, untouched by the grids."""
    a, b, resumed = tmp_path / "a", tmp_path / "b", tmp_path / "resumed"
    for i, out in enumerate((a, b)):
        result = _refine(SG2, teacher32, out, "--steps", "2", "--snapshot-every", "1", seed_before=i)
        assert result.exit_code == 0, result.output
    outputs = ("before.npz", "grid-before.png", "grid-after.png", "network-refined.pkl")
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in outputs)
    assert_same(_final_state(a), _final_state(b))
    # 1 step, then resumed to 2 in a "new process" == the uninterrupted 2 steps
    assert _refine(SG2, teacher32, resumed, "--steps", "1", "--snapshot-every", "1").exit_code == 0
    more = _refine(SG2, teacher32, resumed, "--steps", "2", "--snapshot-every", "1", "--resume", seed_before=7)
    assert more.exit_code == 0, more.output
    assert all((a / n).read_bytes() == (resumed / n).read_bytes() for n in outputs)
    assert_same(_final_state(a), _final_state(resumed))
    (resumed / "before.npz").write_bytes((a / "before.npz").read_bytes()[:100])  # damaged after it was written
    damaged = _refine(SG2, teacher32, resumed, "--steps", "3", "--snapshot-every", "1", "--resume")
    assert damaged.exit_code == 2 and "before.npz: not an .npz file" in damaged.output, damaged.output
    assert "a resumed run cannot measure again" in damaged.output and "Traceback" not in damaged.output


def test_distill_same_seed_twice_and_resume_after_a_hard_kill(tmp_path: Path):
    """Dropout (0.13 in the generator and the fake network) draws from torch's global generator. A distill
    process SIGKILLed right after its first checkpoint, before that snapshot's pickle, resumes to the
    uninterrupted run."""
    a, b, killed = tmp_path / "a", tmp_path / "b", tmp_path / "killed"
    args = ["--steps", "2", "--snapshot-every", "1"]
    for i, out in enumerate((a, b)):
        result = _distill(out, *args, seed_before=i)
        assert result.exit_code == 0, result.output
    snapshots = _files(a, "network-snapshot-*.pkl")
    # unique names by images seen (batch 2): one file per snapshot, nothing overwritten
    assert list(snapshots) == ["network-snapshot-000000002.pkl", "network-snapshot-000000004.pkl"]
    assert list(_files(a, "grid-0*.png")) == ["grid-000000002.png", "grid-000000004.png"]
    assert snapshots == _files(b, "network-snapshot-*.pkl")
    assert _files(a, "*.png") == _files(b, "*.png") and _files(a, "*.npz") == _files(b, "*.npz")
    assert_same(_final_state(a), _final_state(b))
    script = textwrap.dedent("""
        import os, signal, sys
        import refiner.loop as loop
        from refiner.cli import main
        save = loop.RunDir.save_checkpoint
        def save_and_die(self, state, step):
            save(self, state, step)
            os.kill(os.getpid(), signal.SIGKILL)
        loop.RunDir.save_checkpoint = save_and_die
        main(sys.argv[1:])
    """)
    command = ["distill", "--teacher", str(EDM16), "--out", str(killed), "--preset", "cifar10-cond", "--batch", "2",
               "--device", "cpu", "--grid-seeds", "2", "--lr", "1e-3", "--fake-lr", "1e-3", "--log-every", "1",
               *args]
    proc = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in RunDir(killed).checkpoints()] == ["state-00000001.pt"]
    assert not (killed / "network-snapshot-000000002.pkl").exists()
    assert _distill(killed, *args, "--resume", seed_before=3).exit_code == 0
    assert _files(killed, "network-snapshot-*.pkl") == snapshots
    assert _files(killed, "grid-0*.png") == _files(a, "grid-0*.png")
    assert_same(_final_state(a), _final_state(killed))


def test_sample_same_seeds_twice_is_byte_identical(tmp_path: Path):
    for i, name in enumerate("ab"):
        result = _cli("sample", "--teacher", str(EDM16), "--seeds", "0-2", "--steps", "2", "--device", "cpu",
                      "--out", str(tmp_path / name), seed_before=i)
        assert result.exit_code == 0, result.output
    assert _files(tmp_path / "a", "*") == _files(tmp_path / "b", "*")


def test_generated_samples_are_seeded_and_leave_the_global_generator_alone():
    """What metrics and grids draw: a StyleGAN2 with random noise inputs gives the same images for the same
    seed whatever torch's global state, and the caller's global random stream does not move."""
    from metrics.evaluate import generated_batches

    G = load_generator(SG2, noise_mode="random")
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(torch.cat(list(generated_batches(G, 3, batch_size=2, seed=5))))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], torch.cat(list(generated_batches(G, 3, batch_size=2, seed=6))))


# -- the run directory: --force, restart, lock ------------------------------------------------------

def _toy(out: Path | str, *args: str):
    return CliRunner().invoke(cli, ["toy", "--steps", "1", "--batch", "8", "--samples", "20", "--fake-warmup", "0",
                                    "--device", "cpu", "--out", str(out), *args])


def test_force_removes_only_what_runs_wrote(tmp_path: Path, monkeypatch):
    # a folder that is not a run is never used, with or without --force / --resume
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for flags in ((), ("--force",), ("--resume",)):
        result = _toy(other, *flags)
        assert result.exit_code == 2 and "not a refiner run directory" in result.output, result.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # a run written before runs were marked is still one
    run = tmp_path / "run"
    assert _toy(run).exit_code == 0 and (run / MARKER).is_file()
    (run / MARKER).unlink()
    assert _toy(run, "--resume", "--steps", "2").exit_code == 0 and (run / MARKER).is_file()
    # a run: --force deletes the run's files, not a file the user put there
    (run / "notes.txt").write_text("keep me")
    assert _toy(run, "--force").exit_code == 0
    assert (run / "notes.txt").read_text() == "keep me" and [r["step"] for r in RunDir(run).read_log()] == [1]
    # --out . --force never empties the working directory
    monkeypatch.chdir(run)
    result = _toy(".", "--force")
    assert result.exit_code == 2 and "working directory" in result.output
    assert (run / "notes.txt").exists() and (run / "toy.json").exists()


def test_force_refuses_a_run_directory_holding_an_input(tmp_path: Path, teacher32: Path):
    out = tmp_path / "run"
    assert _refine(SG2, teacher32, out, "--steps", "0").exit_code == 0
    # refining the refined file again into the same folder: --force would delete the input
    result = _refine(out / "network-refined.pkl", teacher32, out, "--steps", "1", "--force")
    assert result.exit_code == 2 and "an input of this command" in result.output, result.output
    assert (out / "network-refined.pkl").is_file()


def test_run_killed_before_its_first_checkpoint_restarts(tmp_path: Path):
    out = tmp_path / "run"
    config = TrainConfig(steps=1, batch=8)
    RunDir(out).prepare(config)  # what a run killed before its first checkpoint leaves (lock released)
    (out / ".toy.json.123.tmp").write_text("partial")
    assert _toy(out).exit_code == 0  # no --force needed: nothing to lose
    assert not (out / ".toy.json.123.tmp").exists() and RunDir(out).latest_checkpoint() is not None
    fresh = tmp_path / "fresh"
    RunDir(fresh).prepare(config)
    result = _toy(fresh, "--resume")  # --resume there starts from the beginning and says so
    assert result.exit_code == 0 and "no checkpoint yet" in result.output
    assert "starting from the beginning" in result.output
    # a finished run whose checkpoints were removed is no run killed early: its outputs stay unless --force
    shutil.rmtree(out / "checkpoints")
    (out / "toy-notes.json").write_text("the user's")  # not a name runs write: --force keeps it
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for extra in ((), ("--resume",)):
        refused = _toy(out, *extra)
        assert refused.exit_code == 2 and "holds a run's outputs (toy.json, toy.png) but no checkpoint" in \
            refused.output, refused.output
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _toy(out, "--force").exit_code == 0 and (out / "toy-notes.json").read_text() == "the user's"


def test_force_removes_only_the_names_runs_write(tmp_path: Path):
    """Files of the user's whose names resemble a run's outputs (report.pdf, grid-curated.png,
    network-best-fid.pkl, generator-export.onnx, toy.ipynb) stay; the run's own files go."""
    out = tmp_path / "run"
    assert _toy(out).exit_code == 0
    mine = ["report.pdf", "grid-curated.png", "network-best-fid.pkl", "generator-export.onnx", "toy.ipynb"]
    for name in mine:
        (out / name).write_text("mine")
    (out / "grid-000000016.png").write_text("a snapshot grid")
    assert _toy(out, "--force").exit_code == 0
    assert all((out / name).read_text() == "mine" for name in mine)
    assert not (out / "grid-000000016.png").exists()


def test_a_live_run_is_locked_and_a_dead_ones_lock_is_taken_over(tmp_path: Path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from refiner.config import TrainConfig
            from refiner.rundir import RunDir
            run = RunDir({str(out)!r})
            run.prepare(TrainConfig(steps=1, batch=8), echo=print)
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in ((), ("--force",), ("--resume",)):
            result = _toy(out, *flags)
            lines = result.output.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1, result.output
            assert "in use by a running refiner" in lines[0] and f"pid {holder.pid}" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in (out / LOCK).read_text()  # the dead holder's lock file is still there
    assert _toy(out).exit_code == 0  # and is taken over


# -- teacher identity -------------------------------------------------------------------------------

def _other_weights(path: Path) -> None:
    path.unlink()
    write_edm_teacher(path, seed=1)


def _other_architecture(path: Path) -> None:
    kwargs = {**small_edm_kwargs(), "model_channels": 32}
    nvpickle.dump({"ema": network_record(EDMPrecond(**kwargs), kwargs)}, path, overwrite=True)


@pytest.mark.parametrize("replace", [_other_weights, _other_architecture],
                         ids=["other-weights", "other-architecture"])
def test_resume_with_another_teacher_is_refused(tmp_path: Path, replace):
    teacher = write_edm_teacher(tmp_path / "t.pkl")
    out = tmp_path / "run"
    assert _refine(SG2, teacher, out, "--steps", "1").exit_code == 0
    replace(teacher)
    result = _refine(SG2, teacher, out, "--steps", "2", "--resume")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "was trained with teacher" in lines[0] and lines[0].count(str(teacher)) == 2


def test_resume_takes_the_same_inputs_by_another_name_and_names_an_input_that_differs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Inputs are recorded as absolute paths and compared by what they name: a resume from another working
    directory with relative names, or with a byte-identical copy of the teacher (its sha256 is checked), goes on
    to the uninterrupted run's state; another generator file is refused with a message that names the option."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    teacher = write_edm_teacher(inputs / "t.pkl")
    generator = inputs / "g.pkl"
    shutil.copy(SG2, generator)
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _refine(generator, teacher, straight, "--steps", "2", "--snapshot-every", "1").exit_code == 0
    assert _refine(generator, teacher, run, "--steps", "1", "--snapshot-every", "1").exit_code == 0
    assert json.loads((run / "config.json").read_text())["extra"]["teacher"] == str(teacher)  # absolute
    copy = tmp_path / "elsewhere" / "copy-of-t.pkl"
    copy.parent.mkdir()
    shutil.copy(teacher, copy)
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = _refine(Path("../inputs/g.pkl"), Path("copy-of-t.pkl"), Path("../run"), "--steps", "2",
                      "--snapshot-every", "1", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = _final_state(straight), _final_state(run)
    assert b["config"]["extra"].pop("teacher") == str(copy)  # what the resumed command named, made absolute
    assert b["teacher"].pop("name") == "copy-of-t.pkl" and a["teacher"].pop("name") == str(teacher)
    a["config"]["extra"].pop("teacher")
    assert_same(a, b)  # and the same sha256
    other = tmp_path / "other-g.pkl"
    shutil.copy(generator, other)  # the same bytes, but not the same file: refine writes back into --generator
    refused = _refine(other, teacher, run, "--steps", "3", "--resume")
    assert refused.exit_code == 2
    line, = refused.output.strip().splitlines()
    assert "another configuration: generator (checkpoint" in line and str(other) in line and "teacher" not in line


# -- --in-place -------------------------------------------------------------------------------------

def test_in_place_with_resize_to_teacher_on_a_biggan_folder(tmp_path: Path):
    folder = tmp_path / "biggan"
    shutil.copytree(BIGGAN, folder)
    original = _files(folder, "*")
    teacher = write_edm_teacher(tmp_path / "t16.pkl", resolution=16, label_dim=10)
    result = _refine(folder, teacher, tmp_path / "run", "--steps", "1", "--in-place", "--resize-to-teacher",
                     "--truncation", "0.5")
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "biggan.bak", "*") == original
    assert _files(folder, "*") == _files(tmp_path / "run" / "biggan-refined", "*") != original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["biggan", "biggan.bak", "run", "t16.pkl"]
    again = _refine(BIGGAN, teacher, tmp_path / "again", "--steps", "1", "--resize-to-teacher", "--truncation", "0.5")
    assert again.exit_code == 0, again.output  # the same command twice: the same bytes, BigGAN's weights too
    assert _files(tmp_path / "again" / "biggan-refined", "*") == _files(tmp_path / "run" / "biggan-refined", "*")


def test_in_place_with_resize_and_every_stylegan2_option(tmp_path: Path):
    gen = tmp_path / "sg2.pkl"
    shutil.copy(SG2, gen)
    teacher = write_edm_teacher(tmp_path / "t16.pkl", resolution=16)
    result = _refine(gen, teacher, tmp_path / "run", "--steps", "1", "--in-place", "--resize-to-teacher",
                     "--keep-G", "--trainable", "mapping-frozen", "--noise-mode", "const")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sg2.pkl.bak").read_bytes() == SG2.read_bytes()
    assert gen.read_bytes() == (tmp_path / "run" / "network-refined.pkl").read_bytes() != SG2.read_bytes()


def test_a_failed_in_place_copy_leaves_the_input_and_no_partial_file(tmp_path: Path, monkeypatch):
    gen, refined = tmp_path / "sg2.pkl", tmp_path / "out" / "network-refined.pkl"
    shutil.copy(SG2, gen)
    refined.parent.mkdir()
    shutil.copy(SG2, refined)
    reference = load_generator(refined)

    def disk_full(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    with pytest.raises(UserError, match="no space left on device while writing .*sg2.pkl.bak"):
        replace_input(gen, refined, tmp_path / "sg2.pkl.bak", reference, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sg2.pkl"]  # no FILE.bak, no temp copy
    assert gen.read_bytes() == SG2.read_bytes()


# -- EMA --------------------------------------------------------------------------------------------

def test_ema_beta_follows_edm_rampup_from_the_count_before_each_batch(tmp_path: Path, monkeypatch):
    """EDM training_loop.py: h = min(ema_halflife_kimg·1000, cur_nimg·ema_rampup_ratio), β = 0.5^(batch /
    max(h, 1e-8)), with cur_nimg the images seen *before* the step. Batch 4, half-life 10 images, ramp-up
    0.05: h = 0, 0.2, 0.4, 0.6, 0.8 → β = 0, 0.5^20, 0.5^10, 0.5^(20/3), 0.5^5."""
    from gan_adapters.mlp import MLPGenerator
    from teachers.analytic import ring
    from teachers.mlp import MLPDenoiser

    betas: list[float] = []
    monkeypatch.setattr(loop, "update_ema", lambda ema, model, beta: betas.append(beta))
    config = TrainConfig(steps=5, batch=4, ema=0.01, ema_rampup=0.05, device="cpu")
    run = RunDir(tmp_path / "run")
    run.prepare(config)
    loop.Trainer(config, MLPGenerator(), ring(), MLPDenoiser(sigma_data=0.7), run, torch.device("cpu")).train()
    assert betas == [0.5 ** (4 / max(min(10, cur_nimg * 0.05), 1e-8)) for cur_nimg in (0, 4, 8, 12, 16)]
    assert betas[:3] == [0.0, 0.5 ** 20, 0.5 ** 10]


# -- --sigma-init -----------------------------------------------------------------------------------

@pytest.fixture
def foreign_onestep(tmp_path: Path) -> Path:
    """A Diff-Instruct snapshot: the generator as `ema` (EDM layout) without refiner's metadata."""
    record = nvpickle.load(EDM16)["ema"]
    path = tmp_path / "di-snapshot.pkl"
    nvpickle.dump({"ema": record}, path)
    return path


def test_refine_a_foreign_onestep_snapshot_with_sigma_init(tmp_path: Path, foreign_onestep: Path):
    missing = _refine(foreign_onestep, EDM16, tmp_path / "r0", "--steps", "1")
    assert missing.exit_code == 2 and "--sigma-init (1.0 for Diff-Instruct, 2.5 for SiD, 80 for DMD2" in missing.output
    result = _refine(foreign_onestep, EDM16, tmp_path / "r", "--steps", "1", "--sigma-init", "2.5")
    assert result.exit_code == 0, result.output
    refined = load_generator(tmp_path / "r" / "network-refined.pkl")  # carries our metadata now
    assert isinstance(refined, OneStepGenerator) and refined.sigma_init == 2.5
    assert _refine(SG2, EDM16, tmp_path / "r2", "--keep-G", "--sigma-init", "1").exit_code == 2
    # Diff-Instruct keeps its fake score beside the generator: --in-place would lose it
    with_fake = tmp_path / "di-with-fake.pkl"
    record = nvpickle.load(foreign_onestep)["ema"]
    nvpickle.dump({"ema": record, "Sg": record}, with_fake)
    result = _refine(with_fake, EDM16, tmp_path / "r3", "--steps", "1", "--sigma-init", "1", "--in-place")
    assert result.exit_code == 2 and "--in-place would drop Sg" in result.output, result.output


def test_metrics_reads_sigma_init(tmp_path: Path, foreign_onestep: Path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli_metrics, "_load_detector", lambda *a: object())
    monkeypatch.setattr(cli_metrics, "evaluate", lambda source, *a, **k: seen.append(source) or {"is_mean": 1.0})
    ok = _cli("metrics", "--generator", str(foreign_onestep), "--sigma-init", "2.5", "--metrics", "is20", "--json")
    assert ok.exit_code == 0, ok.output
    assert isinstance(seen[0], OneStepGenerator) and seen[0].sigma_init == 2.5
    missing = _cli("metrics", "--generator", str(foreign_onestep), "--metrics", "is20")
    assert missing.exit_code == 2 and "SiD" in missing.output


def test_sample_a_onestep_generator_in_one_step(tmp_path: Path, foreign_onestep: Path):
    result = _cli("sample", "--teacher", str(foreign_onestep), "--sigma-init", "2.5", "--seeds", "0-2",
                  "--device", "cpu", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        x, labels = f["x"], f["labels"]
    # by hand: the raw network D(2.5·z; 2.5, c) at each seed's latents and labels
    noise = SeededNoise([0, 1, 2], torch.device("cpu"))
    z, c = noise.randn((3, 16, 16)), torch.nn.functional.one_hot(noise.randint(10), 10).float()
    assert labels.tolist() == c.argmax(1).tolist()
    with torch.no_grad():
        expected = to_uint8(build_network(nvpickle.load(EDM16)["ema"])(2.5 * z, torch.full([3], 2.5), c))
    assert np.array_equal(x, expected)



def test_resume_drops_the_log_and_metric_records_written_after_the_checkpoint(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.prepare(TrainConfig(steps=4, device="cpu"))
    for name in ("log.jsonl", "metrics.jsonl"):
        (run.path / name).write_text("".join(json.dumps({"step": s, "kimg": s / 1000}) + "\n" for s in (1, 2, 3))
                                     + '{"step": 4, "ki')  # the last line cut by a hard stop
    run.truncate_log(2)
    for name in ("log.jsonl", "metrics.jsonl"):
        assert [json.loads(line)["step"] for line in (run.path / name).read_text().splitlines()] == [1, 2]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_folder_replaced_in_place_is_swapped_whole_or_left_as_it_was(tmp_path: Path, monkeypatch):
    """BigGAN-deep --in-place: the refined files and the input's other files take the folder's place in one
    swap. A copy that fails part-way (the refined files into the staged folder) or a swap that fails leaves
    the input folder byte for byte as it was, and neither a backup nor a temporary folder. The old code
    copied file by file into the input: a later failure found pytorch_model.bin replaced and deleted the
    backup."""
    folder, refined = tmp_path / "biggan", tmp_path / "out" / "biggan-refined"
    shutil.copytree(BIGGAN, folder)
    (folder / "README.txt").write_text("the user's notes")
    refined.parent.mkdir()
    generator = load_generator(BIGGAN)
    with torch.no_grad():
        next(generator.parameters()).add_(1.0)
    generator.save(refined)
    original, written = _tree(folder), _tree(refined)
    assert written["pytorch_model.bin"] != original["pytorch_model.bin"]

    copytree, rename, calls = shutil.copytree, os.rename, []

    def copytree_failing_part_way(src, dst, **kwargs):  # 1: the backup, 2: the input, 3: the refined files
        calls.append(src)
        if len(calls) == 3:
            shutil.copy(Path(src) / "pytorch_model.bin", Path(dst) / "pytorch_model.bin")
            raise OSError(errno.EIO, "Input/output error")
        return copytree(src, dst, **kwargs)

    def swap_failing(src, dst):  # the second of the two renames that replace a one-step exchange
        if Path(dst) == folder and not calls:
            calls.append(src)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst)

    def exchange_failing(a, b):
        raise OSError(errno.EIO, "Input/output error")

    for patches, message in (([(shutil, "copytree", copytree_failing_part_way)], "Input/output error"),
                             ([(atomic, "exchange", lambda a, b: False), (os, "rename", swap_failing)],
                              "cross-device"),
                             ([(atomic, "exchange", exchange_failing)], "Input/output error")):
        calls.clear()
        with monkeypatch.context() as m:
            for module, name, value in patches:
                m.setattr(module, name, value)
            with pytest.raises(OSError, match=message):
                replace_input(folder, refined, tmp_path / "biggan.bak", generator, {})
        assert _tree(folder) == original, patches
        assert sorted(p.name for p in tmp_path.iterdir()) == ["biggan", "out"]  # no backup, no temporary folder

    replace_input(folder, refined, tmp_path / "biggan.bak", generator, {})
    assert _tree(tmp_path / "biggan.bak") == original and _tree(folder) == {**original, **written}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["biggan", "biggan.bak", "out"]


def test_an_interrupt_after_the_input_is_replaced_keeps_the_backup(tmp_path: Path, monkeypatch):
    """Ctrl-C while the last steps of --in-place run (the pickle's mode copied after its rename; the old folder
    removed after the swap): the input is the refined one by then, so FILE.bak must stay, whole. The old code
    deleted the backup on any interrupt and the original was lost."""
    gen, refined = tmp_path / "sg2.pkl", tmp_path / "out" / "network-refined.pkl"
    shutil.copy(SG2, gen)
    refined.parent.mkdir()
    generator = load_generator(SG2)
    with torch.no_grad():
        generator.network.mapping.fc0.weight.mul_(2.0)
    generator.save(refined)

    copymode = shutil.copymode

    def interrupt_after_the_rename(src, dst, **kwargs):
        if Path(dst) == gen:
            raise KeyboardInterrupt
        return copymode(src, dst, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(shutil, "copymode", interrupt_after_the_rename)
        with pytest.raises(KeyboardInterrupt):
            replace_input(gen, refined, tmp_path / "sg2.pkl.bak", generator, {})
    assert gen.read_bytes() == refined.read_bytes() and (tmp_path / "sg2.pkl.bak").read_bytes() == SG2.read_bytes()

    folder, refined_folder = tmp_path / "biggan", tmp_path / "out" / "biggan-refined"
    shutil.copytree(BIGGAN, folder)
    biggan = load_generator(BIGGAN)
    with torch.no_grad():
        next(biggan.parameters()).add_(1.0)
    biggan.save(refined_folder)
    rmtree = shutil.rmtree

    def interrupt_removal_of_the_old_folder(path, *args, **kwargs):
        if Path(path).name.startswith(".biggan.") and not Path(path).name.startswith(".biggan.bak."):
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", interrupt_removal_of_the_old_folder)
        with pytest.raises(KeyboardInterrupt):
            replace_input(folder, refined_folder, tmp_path / "biggan.bak", biggan, {})
    assert _tree(folder) == _tree(refined_folder) and _tree(tmp_path / "biggan.bak") == _tree(BIGGAN)


def test_force_never_deletes_an_input_given_as_init_or_ref(tmp_path: Path):
    """distill --force --init OUT/network-snapshot-...pkl: the starting generator lies among the files that
    starting over deletes, so it is refused and the file stays (it was deleted, then written anew)."""
    out = tmp_path / "run"
    assert _distill(out, "--steps", "2", "--snapshot-every", "1").exit_code == 0
    snapshot = out / "network-snapshot-000000004.pkl"
    kept = snapshot.read_bytes()
    refused = _distill(out, "--steps", "1", "--force", "--init", str(snapshot))
    assert refused.exit_code == 2 and f"holds {snapshot}, an input of this command" in refused.output, refused.output
    assert snapshot.read_bytes() == kept
    np.savez(out / "before.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # in a run's name: a --ref there, too
    refused = _distill(out, "--steps", "1", "--force", "--metrics", "fid2", "--ref", str(out / "before.npz"))
    assert refused.exit_code == 2 and "an input of this command" in refused.output, refused.output


def test_sigterm_ends_a_command_through_its_cleanup(tmp_path: Path):
    """SIGTERM (kill, Slurm) while a checkpoint is being written: the temporary file goes, the exit code is
    128 + 15, and the run resumes. Python's default ended the process at once and left the temporary file."""
    out = tmp_path / "run"
    script = textwrap.dedent("""
        import os, signal, sys
        import fileformats.atomic as atomic
        from refiner.cli import main
        fsync = atomic.os.fsync
        def fsync_then_term(fd):
            fsync(fd)
            if "state-" in os.readlink(f"/proc/self/fd/{fd}"):
                os.kill(os.getpid(), signal.SIGTERM)
        atomic.os.fsync = fsync_then_term
        main(sys.argv[1:])
    """)
    command = ["toy", "--steps", "2", "--batch", "16", "--samples", "50", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert not list(out.rglob(".*.tmp")) and not RunDir(out).checkpoints()
    assert _cli(*command, "--resume").exit_code == 0


def test_in_place_removes_the_temporary_copies_a_killed_in_place_left(tmp_path: Path):
    from gan_adapters.writeback import in_place_backup

    target = tmp_path / "sg2.pkl"
    shutil.copy(SG2, target)
    (tmp_path / ".sg2.pkl.a1b2c3.tmp").write_bytes(b"half a copy")
    (tmp_path / ".sg2.pkl.bak.d4e5f6.tmp").mkdir()
    (tmp_path / ".notes.txt.x.tmp").write_text("another program's")
    in_place_backup(str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.x.tmp", "sg2.pkl"]


def test_a_resumed_log_averages_the_steps_the_uninterrupted_one_does(tmp_path: Path):
    """--log-every 2 --snapshot-every 3, killed right after step 4 was logged: the resume starts at the step-3
    checkpoint, and its step-4 record must average steps 3 and 4 as the uninterrupted run's does (the window
    of statistics since the last record is kept in the checkpoint); it averaged step 4 alone."""
    args = ["toy", "--steps", "6", "--batch", "16", "--samples", "50", "--device", "cpu", "--log-every", "2",
            "--snapshot-every", "3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _cli(*args, "--out", str(whole)).exit_code == 0
    script = textwrap.dedent("""
        import os, signal, sys
        import refiner.loop as loop
        from refiner.cli import main
        log = loop.Trainer._log
        def log_and_die(self, window):
            log(self, window)
            if self.counters.step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        loop.Trainer._log = log_and_die
        main(sys.argv[1:])
    """)
    proc = subprocess.run([sys.executable, "-c", script, *args, "--out", str(killed)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _cli(*args, "--out", str(killed), "--resume").exit_code == 0
    timing = ("img_per_s", "peak_rss_mb")

    def records(run: Path) -> list[dict]:
        lines = (run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert [r["step"] for r in records(killed)] == [2, 4, 6]
    assert records(killed) == records(whole)
