"""One run = one directory: config.json, log.jsonl, checkpoints/, and the job's outputs."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

from common.errors import UserError
from fileformats.atomic import append_text, atomic_open, atomic_write_text, ensure_dir, remove_stale_temps
from fileformats.npz import read_npz
from fileformats.torchfiles import load_weights
from refiner import distributed as dist
from refiner.config import TrainConfig

_CKPT = re.compile(r"^state-(\d{8})\.pt$")


MARKER = ".refiner-run"  # written first into every run directory: what --force may empty is marked ours
LOCK = ".refiner-lock"  # flock'ed for a run's life; holds "pid host" of the holder for the message
_IMAGES_SEEN = "[0-9]" * 9  # NNNNNNNNN in the names of snapshot files
# What runs write once they are past their first checkpoint (snapshots, the end): a run that holds any of these
# and no checkpoint had its checkpoints removed; it is restarted only with --force.
SNAPSHOT_FILES = (f"grid-{_IMAGES_SEEN}.png", "grid-after.png", "report.html", "report.json",
                  "network-refined.pkl", f"network-snapshot-{_IMAGES_SEEN}.pkl", "generator-refined.pt",
                  "generator-onestep.pkl", "biggan-refined", f"biggan-snapshot-{_IMAGES_SEEN}", "toy.json", "toy.png",
                  "grids.png")
# What runs write into their directory, by exact name (every job's outputs): --force and a restart remove these
# and nothing else, so a file of the user's with a similar name (report.pdf, grid-curated.png) stays.
RUN_FILES = (MARKER, LOCK, "config.json", "log.jsonl", "checkpoints", "before.npz", "grid-before.png",
             "metrics.jsonl", "toy.before.npz", "grid-teacher.png", "grid-real.png", ".*.tmp", *SNAPSHOT_FILES)


class RunDir:
    """The run directory. `prepare` enforces: a non-empty directory must be a run (it holds `MARKER`); a run
    with a checkpoint needs --resume (continue) or --force (start over); a run killed before its first
    checkpoint simply starts again; a resume needs a checkpoint written with the same configuration; a
    second process on a live run is refused (`LOCK`). Nothing on disk is changed before these checks pass,
    and starting over removes only the files a run writes (`RUN_FILES`), never an input of the command nor
    the working directory."""

    def __init__(self, path: str | Path, keep_checkpoints: int = 2):
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints
        self._lock: IO | None = None

    config_path = property(lambda self: self.path / "config.json")
    log_path = property(lambda self: self.path / "log.jsonl")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")

    def prepare(self, config: TrainConfig, resume: bool = False, force: bool = False,
                inputs: Iterable[str | os.PathLike] = (),
                echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path | None:
        """Check the directory against the request and lock it for this process (until `release`);
        returns the checkpoint to resume from (or None). `inputs`: the command's input files, which a
        fresh start must not delete."""
        if resume and force:
            raise UserError("--resume and --force exclude each other: --resume continues the run in --out, "
                            "--force deletes it and starts over")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a directory; choose another --out")
        existing = self.path.is_dir() and any(self.path.iterdir())
        if existing and not self._is_run():
            raise UserError(f"--out {self.path} holds files but is not a refiner run directory (no {MARKER}); "
                            f"refiner never deletes or mixes into it: choose a new or empty --out")
        self._acquire()
        try:
            checkpoint = self.latest_checkpoint() if existing else None
            if resume and checkpoint is None:
                echo(f"--resume: {self.path} has no checkpoint yet (its run stopped before the first one "
                     f"or never started); starting from the beginning")
            if resume and checkpoint is not None:
                stored = self.read_config()
                diffs = stored.differences(config, checked=("teacher",))  # by sha256 in Trainer.resume
                if diffs:
                    raise UserError(f"--resume: the checkpoint in {self.path} was written with another "
                                    f"configuration: {'; '.join(diffs)}. Use the same options, or a new --out")
            elif checkpoint is not None and not force:
                raise UserError(f"--out {self.path} holds a run with checkpoints; add --resume to continue it, "
                                f"--force to delete it and start over, or choose a new --out")
            outputs = sorted(self._matching(SNAPSHOT_FILES)) if existing and checkpoint is None else []
            if outputs and not force:
                raise UserError(f"--out {self.path} holds a run's outputs ({', '.join(outputs[:3])}) but no "
                                "checkpoint (checkpoints/ was removed), so it cannot be resumed: --force deletes "
                                "them and starts over; or choose a new --out")
            if existing and (checkpoint is None or force):
                self._clear(inputs)
                checkpoint = None
        except BaseException:
            self.release()
            raise
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._lock.flush()
        self.checkpoint_dir.mkdir(exist_ok=True)
        remove_stale_temps(self.path, self.checkpoint_dir)  # left by a killed run
        if checkpoint is None:
            atomic_write_text(self.config_path, json.dumps(config.to_json(), indent=2) + "\n")
        return checkpoint

    def kept(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, np.ndarray]:
        """Arrays a run computes once and keeps in the file `name` (.npz) of its directory, so that a resumed
        run uses the very same ones (the untrained generator's samples, grid and metrics): read back when
        the file exists, else `compute()`d and written atomically."""
        path = self.path / name
        if not path.exists():
            with atomic_open(path) as f:
                np.savez(f, **compute())
        try:
            return read_npz(path)
        except UserError as e:  # damaged after the run wrote it: what it kept cannot be made again
            raise UserError(f"{e}; it keeps what this run measured before training, which a resumed run cannot "
                            "measure again: start a new run with another --out (or --force)") from None

    # -- ownership and lock ---------------------------------------------------------------------------
    def _is_run(self) -> bool:
        """Marked as a run, or a run written before the marker existed (config.json and checkpoints/)."""
        return (self.path / MARKER).is_file() or (self.config_path.is_file() and self.checkpoint_dir.is_dir())

    def _acquire(self) -> None:
        """Create the directory (marked as a run) if needed and take its lock: an exclusive flock on LOCK,
        which the kernel drops when the process ends in any way, so a killed run leaves no stale lock (the
        file stays; its text, "pid P on HOST", only names the holder). `prepare` writes that text once
        its checks pass, so a refused request changes nothing."""
        try:
            ensure_dir(self.path)
            if not (self.path / MARKER).is_file():
                atomic_write_text(self.path / MARKER, "a refiner run directory: --force may delete what runs "
                                                      "wrote here\n")
            f = open(self.path / LOCK, "a+")
        except OSError as e:
            raise UserError(f"cannot write into --out {self.path} ({e.strerror or e}); choose a folder you can "
                            f"write to") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"--out {self.path} is in use by a running refiner ({holder}); wait for it to "
                            f"finish, or choose another --out") from None
        self._lock = f

    def release(self) -> None:
        """Give up the lock (also dropped by the kernel when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _clear(self, inputs: Iterable[str | os.PathLike]) -> None:
        """Remove what earlier runs wrote here (RUN_FILES except the marker and our lock). Refused for the
        working directory (or one above it) and when an input of this command is among those files."""
        here = self.path.resolve()
        if here == Path.cwd().resolve() or here in Path.cwd().resolve().parents:
            raise UserError(f"--out {self.path} is the working directory (or contains it); refiner does not "
                            f"empty it: choose a subfolder as --out")
        doomed = [self.path / name for name in self._matching(RUN_FILES) if name not in (MARKER, LOCK)]
        for item in inputs:
            resolved = Path(item).resolve()
            if any(resolved == child.resolve() or child.resolve() in resolved.parents for child in doomed):
                raise UserError(f"--out {self.path} holds {item}, an input of this command; starting over "
                                f"there would delete it: choose another --out")
        for child in doomed:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _matching(self, patterns: Iterable[str]) -> list[str]:
        """Names in the directory that match one of `patterns` (fnmatch, case-sensitive)."""
        return [child.name for child in self.path.iterdir()
                if any(fnmatch.fnmatchcase(child.name, pattern) for pattern in patterns)]

    def read_config(self) -> TrainConfig:
        try:
            return TrainConfig.from_json(json.loads(self.config_path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"cannot read {self.config_path} ({e}); the run directory is damaged: "
                            f"start a new run with another --out") from None

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.iterdir() if _CKPT.match(p.name))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, state: dict[str, Any], step: int) -> Path:
        """Write the training state atomically, then drop the oldest beyond `keep_checkpoints`."""
        path = self.checkpoint_dir / f"state-{step:08d}.pt"
        with atomic_open(path) as f:
            torch.save(state, f)
        for old in self.checkpoints()[:-self.keep_checkpoints]:
            old.unlink()
        return path

    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        return load_weights(path, f"checkpoint {path}", "delete it to resume from the previous one")

    # -- log ----------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        append_text(self.log_path, json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop the records of log.jsonl and metrics.jsonl written after `step` (by a run that was killed
        after its last checkpoint), so a resumed run's records equal an uninterrupted run's."""
        for path in (self.log_path, self.path / "metrics.jsonl"):
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if line.strip() and _record_step(line) <= step]
                atomic_write_text(path, "".join(line + "\n" for line in kept))

    def read_log(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log_path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (log.jsonl, metrics.jsonl), one per non-blank line; none if it does
    not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def open_run(out: str | Path, config: TrainConfig, resume: bool = False, force: bool = False,
             inputs: Iterable[str | os.PathLike] = (),
             echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Iterator[tuple[RunDir, Path | None]]:
    """The run directory `out` prepared for `config` and locked (`RunDir.prepare`; under torchrun by rank 0
    alone), with the checkpoint to resume from (None: a fresh start); the lock is released on any exit.
    Every job runs inside it: `with open_run(out, config, resume, force) as (run, checkpoint): ...`."""
    config.local_chunks(dist.world_size())  # a batch that does not split over the processes: refused before writing
    run = RunDir(out)
    checkpoint = dist.on_rank0(lambda: run.prepare(config, resume=resume, force=force, inputs=inputs, echo=echo))
    try:
        yield run, checkpoint
    finally:
        run.release()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:  # a line cut by a hard stop
        return 1 << 62
