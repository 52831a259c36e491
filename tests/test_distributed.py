"""Data parallelism: `torchrun --nproc_per_node 2 -m refiner distill` (two gloo processes on CPU) follows
the trajectory of one process with the same global batch, rank 0 alone writes files and prints, and a
run resumes from a checkpoint written under the other process count (1 -> 2 and 2 -> 1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fileformats import nvpickle
from refiner.cli import cli
from tests.helpers import DATA

TEACHER = DATA / "edm-small-ddpmpp-edm-cond.pkl"
TEACHER_WEIGHTS = {f"network.{k}": v for k, v in nvpickle.load(TEACHER)["ema"].state_dict().items()}
# dropout 0: dropout masks come from each process's own RNG, so only a run without it is reproducible
# across process counts (everything else the loop draws from one seeded generator for the global batch)
ARGS = ["--teacher", str(TEACHER), "--batch", "4", "--device", "cpu", "--grid-seeds", "1", "--log-every", "1",
        "--snapshot-every", "2", "--dropout", "0", "--lr", "1e-3", "--fake-lr", "1e-3"]


def _one_process(out: Path, *args: str) -> None:
    result = CliRunner().invoke(cli, ["distill", *ARGS, "--out", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _two_processes(out: Path, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "refiner", "distill", *ARGS, "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _state(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"state-{step:08d}.pt", weights_only=True)


def _flat(tensors: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().double() for k in keys])


def _assert_same_training_state(a: dict, b: dict) -> None:
    """Same counters and random state; the same weights and Adam second moments up to float rounding.

    Weights are compared by how far they moved from the teacher: Adam with beta1 = 0 moves a weight by
    about lr·g/(|g| + 1e-8), so a gradient that is zero up to rounding (the key part of attention biases)
    moves it by a rounding-dependent fraction of lr. Those entries bound the relative difference at ~2e-3;
    a wrong batch slice differs by O(1). The second moments (1 − beta2)·g² catch a wrong gradient scale
    (a sum over processes instead of the mean would be 4x here)."""
    assert a["counters"] == b["counters"]
    assert torch.equal(a["rng"]["loop"], b["rng"]["loop"])
    keys = sorted(TEACHER_WEIGHTS)
    for net in ("generator", "fake", "ema"):
        start, moved, other = _flat(TEACHER_WEIGHTS, keys), _flat(a[net], keys), _flat(b[net], keys)
        assert float((other - moved).norm() / (moved - start).norm()) < 1e-2, net
    for opt in ("opt_g", "opt_f"):
        v_a, v_b = (torch.cat([s["exp_avg_sq"].flatten() for s in x[opt]["state"].values()]) for x in (a, b))
        assert float((v_b - v_a).norm() / v_a.norm()) < 1e-4, opt


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    _one_process(out, "--steps", "4")
    return out


def test_two_processes_follow_one_and_resume_in_one(single: Path, tmp_path: Path):
    out = tmp_path / "two"
    stdout = _two_processes(out, "--steps", "2")
    before = _state(single, 2)
    _assert_same_training_state(before, _state(out, 2))
    assert not all(torch.equal(before["generator"][k], v) for k, v in _state(single, 4)["generator"].items())
    # rank 0 alone prints and writes: one result line, one log record per step
    assert [json.loads(line)["steps"] for line in stdout.splitlines() if line.startswith("{")] == [2]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    _one_process(out, "--steps", "4", "--resume")  # 2 -> 1 process
    _assert_same_training_state(_state(single, 4), _state(out, 4))


def test_one_process_run_resumes_in_two(single: Path, tmp_path: Path):
    out = tmp_path / "resumed"
    shutil.copytree(single, out)
    (out / "checkpoints" / "state-00000004.pt").unlink()  # as if stopped after step 2
    _two_processes(out, "--steps", "4", "--resume")  # 1 -> 2 processes
    _assert_same_training_state(_state(single, 4), _state(out, 4))
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_reuse_pass_in_two_processes_follows_one(tmp_path: Path):
    """--reuse-pass: the fake step done inside the generator step averages its gradient over the processes too."""
    _one_process(tmp_path / "one", "--steps", "2", "--reuse-pass")
    _two_processes(tmp_path / "two", "--steps", "2", "--reuse-pass")
    one, two = _state(tmp_path / "one", 2), _state(tmp_path / "two", 2)
    assert one["counters"]["fake_steps"] == 2  # no separate fake step: one per iteration, in the shared pass
    _assert_same_training_state(one, two)


def test_processes_given_different_teachers_refuse_together(tmp_path: Path):
    """Two ranks launched as torchrun launches them, each with its own teacher file (the same path holding
    different files on two machines): both stop with one line naming what differs, before any training.
    They trained before, each on its own teacher, with averaged gradients."""
    import os
    import socket

    from tests.helpers import write_edm_teacher

    teachers = [write_edm_teacher(tmp_path / f"teacher{i}.pkl", seed=i, resolution=16, label_dim=10) for i in (0, 1)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a for a in ARGS if a != str(TEACHER)]
    args.remove("--teacher")
    processes = []
    for rank, teacher in enumerate(teachers):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "refiner", "distill", *args, "--teacher", str(teacher), "--steps", "1",
             "--out", str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).parents[1]))
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-2000:]
        assert "the 2 processes differ in teacher: every process must get the same files" in err
        assert "Traceback" not in err
    assert not list((tmp_path / "run").glob("checkpoints/*"))
