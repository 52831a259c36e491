"""One run = one directory: config.json, log.jsonl, checkpoints/, and the job's outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fileformats.atomic import append_text, atomic_open, atomic_write_text, ensure_dir, remove_stale_temps
from fileformats.errors import UserError
from refiner.config import TrainConfig

_CKPT = re.compile(r"^state-(\d{8})\.pt$")


class RunDir:
    """The run directory. `prepare` enforces: a non-empty directory needs --resume (continue) or --force
    (start over); a resume needs a checkpoint written with the same configuration. Nothing on disk is
    changed before these checks pass."""

    def __init__(self, path: str | Path, keep_checkpoints: int = 2):
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints

    config_path = property(lambda self: self.path / "config.json")
    log_path = property(lambda self: self.path / "log.jsonl")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")

    def prepare(self, config: TrainConfig, resume: bool = False, force: bool = False) -> Path | None:
        """Check the directory against the request; returns the checkpoint to resume from (or None)."""
        if resume and force:
            raise UserError("--resume and --force exclude each other: --resume continues the run in --out, "
                            "--force deletes it and starts over")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a directory; choose another --out")
        existing = self.path.is_dir() and any(self.path.iterdir())
        checkpoint = None
        if resume:
            checkpoint = self.latest_checkpoint()
            if checkpoint is None:
                raise UserError(f"--resume: no checkpoint in {self.checkpoint_dir}; "
                                f"start a new run without --resume")
            stored = self.read_config()
            diffs = stored.differences(config)
            if diffs:
                raise UserError(f"--resume: the checkpoint in {self.path} was written with another "
                                f"configuration: {'; '.join(diffs)}. Use the same options, or a new --out")
        elif existing and not force:
            raise UserError(f"--out {self.path} already holds files; add --resume to continue that run, "
                            f"--force to delete it and start over, or choose a new --out")
        elif existing and force:
            shutil.rmtree(self.path)
        ensure_dir(self.path)
        self.checkpoint_dir.mkdir(exist_ok=True)
        remove_stale_temps(self.path, self.checkpoint_dir)  # left by a killed run
        if checkpoint is None:
            atomic_write_text(self.config_path, json.dumps(config.to_json(), indent=2) + "\n")
        return checkpoint

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
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: say which one and what to do
            raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it to resume "
                            f"from the previous one") from None

    # -- log ----------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        append_text(self.log_path, json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log records written after `step` (by a run that was killed after its last checkpoint)."""
        if not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and _record_step(line) <= step]
        atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:  # a line cut by a hard stop
        return 1 << 62
