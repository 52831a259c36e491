"""What every image job (refine, distill, demo) does around the loop: the run directory, before/after
grids of the same seeds, metrics before the first step and after the last (and at snapshots when asked),
the generator written in its native format at every snapshot, and the report.

Under torchrun every process trains; rank 0 alone prepares the run directory, computes grids and
metrics and writes files (the others wait for it in the loop's next collective)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fileformats.atomic import append_text, atomic_open
from fileformats.errors import UserError
from gan_adapters.base import seeded_global_rng
from metrics.evaluate import generated_batches
from metrics.images import save_image_grid
from metrics.report import write_report
from refiner import distributed as dist
from refiner.augment import AUGMENT_DIM
from refiner.config import TrainConfig
from refiner.loop import Trainer
from refiner.realdata import RealData
from refiner.rundir import RunDir
from teachers.edm_layers import Linear

Evaluator = Callable[[nn.Module], dict[str, float]]


@dataclass
class ImageJob:
    """One refinement / distillation run of an image generator against an image teacher."""

    config: TrainConfig
    generator: nn.Module  # a Generator, trained in place
    teacher: nn.Module  # a frozen Denoiser
    fake: nn.Module  # the fake-score network (trainable)
    out: Path
    device: torch.device
    save_generator: Callable[[nn.Module, Path], None]  # writes a generator (the EMA) in its native format
    output_name: str  # file or folder name of that output inside the run directory; with a '{nimg}'
    # field (images seen, e.g. 'network-snapshot-{nimg:09d}.pkl') every snapshot gets its own file
    evaluate: Evaluator | None = None
    metrics_at_snapshots: bool = False
    grid_seeds: int = 64
    snapshot_grids: bool = False  # also write grid-NNNNNNNNN.png (images seen) of the fixed seeds at every snapshot
    title: str = "Diff-Instruct refinement"
    info: dict[str, Any] = field(default_factory=dict)
    echo: Callable[[str], None] = print
    inputs: tuple[str, ...] = ()  # the command's input files: starting over in `out` must not delete them
    real_data: RealData | None = None  # real images for the adversarial losses (--data)

    nimg: int = field(default=0, init=False)  # images seen at the latest snapshot

    @property
    def output_path(self) -> Path:
        """The latest output (the file of the latest snapshot when output_name has a '{nimg}' field)."""
        return self.out / self.output_name.format(nimg=self.nimg)

    def run(self, resume: bool = False, force: bool = False) -> dict[str, Any]:
        """Prepare and lock the run directory, train, write the outputs; the lock is released on any exit."""
        run = RunDir(self.out)
        checkpoint = dist.on_rank0(lambda: run.prepare(self.config, resume=resume, force=force, inputs=self.inputs,
                                                       echo=self.echo))
        try:
            return self._run(run, checkpoint)
        finally:
            run.release()

    def _run(self, run: RunDir, checkpoint: Path | None) -> dict[str, Any]:
        trainer = Trainer(self.config, self.generator, self.teacher, self.fake, run, self.device,
                          on_snapshot=(self._snapshot,), echo=self.echo, real_data=self.real_data)
        main = dist.rank() == 0
        before = self._before(run, trainer.ema) if main else None
        if checkpoint is not None:
            trainer.resume(checkpoint)
            if main and not self._output_for(trainer).exists():  # killed between checkpoint and snapshot
                with seeded_global_rng(self.config.seed, "snapshot", self.device):
                    self._snapshot(trainer)
        trainer.train()
        self.ema = trainer.ema
        if not main:
            return {"steps": trainer.counters.step}
        with seeded_global_rng(self.config.seed, "after", self.device):
            after = self._measure(trainer.ema, "after")
        grid_after = self._grid(trainer.ema)
        save_image_grid(grid_after, self.out / "grid-after.png")
        log = run.read_log()
        curves = {"loss": {"generator": _series(log, "loss_gen"), "fake score": _series(log, "loss_fake")},
                  "gradient norm": {"generator": _series(log, "grad_norm_gen"),
                                    "fake score": _series(log, "grad_norm_fake")}}
        for name in after:
            points = [(r["kimg"], r[name]) for r in _read_jsonl(self.out / "metrics.jsonl") if name in r]
            if points:
                curves[name] = {name: tuple(map(list, zip(*points)))}
        write_report(self.out, before["metrics"], after, grid_before=before["grid"], grid_after=grid_after,
                     curves=curves, title=self.title,
                     info={**self.info, "steps": trainer.counters.step, "kimg": trainer.counters.nimg / 1000,
                           "skipped steps": trainer.counters.skipped_generator + trainer.counters.skipped_fake,
                           "output": self.output_path})
        return {"before": before["metrics"], "after": after, "steps": trainer.counters.step,
                "output": str(self.output_path)}

    # -- pieces ------------------------------------------------------------------------------------
    def _before(self, run: RunDir, generator: nn.Module) -> dict[str, Any]:
        """Grid and metrics of the untrained generator, computed once and kept in the run directory."""
        path = run.path / "before.npz"
        if path.exists():
            stored = np.load(path)
            return {"grid": stored["grid"], "metrics": json.loads(str(stored["metrics"]))}
        grid = self._grid(generator)
        with seeded_global_rng(self.config.seed, "before", self.device):
            metrics = self._measure(generator, "before")
        save_image_grid(grid, run.path / "grid-before.png")
        with atomic_open(path) as f:
            np.savez(f, grid=grid, metrics=json.dumps(metrics))
        return {"grid": grid, "metrics": metrics}

    def _grid(self, generator: nn.Module) -> np.ndarray:
        return torch.cat(list(generated_batches(generator, self.grid_seeds, batch_size=16, seed=0))).numpy()

    def _measure(self, generator: nn.Module, when: str) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        self.echo(f"metrics {when}:")
        was_training = generator.training
        result = self.evaluate(generator.eval())
        generator.train(was_training)
        self.echo("  " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    def _output_for(self, trainer: Trainer) -> Path:
        return self.out / self.output_name.format(nimg=trainer.counters.nimg)

    def _snapshot(self, trainer: Trainer) -> None:
        self.nimg = trainer.counters.nimg
        self.save_generator(trainer.ema, self.output_path)
        if self.snapshot_grids:
            save_image_grid(self._grid(trainer.ema), self.out / f"grid-{self.nimg:09d}.png")
        if self.metrics_at_snapshots and self.evaluate is not None:
            record = {"step": trainer.counters.step, "kimg": trainer.counters.nimg / 1000,
                      **self._measure(trainer.ema, f"at step {trainer.counters.step}")}
            append_text(self.out / "metrics.jsonl", json.dumps(record) + "\n")


def trainable_copy(teacher: nn.Module, augment: bool = False) -> nn.Module:
    """The fake-score network: a copy of the teacher in float32 with trainable weights (the official code
    initialises it from the teacher's weights). `augment`: it will see augmented images (--augment), so
    it needs an augmentation-label input (`add_augment_input`)."""
    # The teacher's network record (what its snapshots are written from) is shared, not copied: the fake score
    # never writes one, and a copy would hold another set of the teacher's weights (+223 MB for a CIFAR DDPM++).
    record = getattr(teacher, "record", None)
    fake = copy.deepcopy(teacher, {} if record is None else {id(record): record}).float().requires_grad_(True)
    if hasattr(fake, "dtype"):
        # U-Net in float32 even where the file says use_fp16: the loop's autocast decides the precision
        fake.dtype = torch.float32
    if augment:
        add_augment_input(fake)
    return fake


def add_augment_input(network: nn.Module, dim: int = AUGMENT_DIM) -> None:
    """Give every EDM U-Net in `network` that has no augmentation-label input one, initialised to zero so
    the outputs do not change (the official code builds its networks with augment_dim 9 whenever
    augmentation is on; EDM's CIFAR-10 teachers have one already, which the copy keeps)."""
    for module in network.modules():
        if not hasattr(module, "map_augment"):
            continue
        if module.map_augment is None:
            module.map_augment = Linear(dim, module.map_layer0.in_features, bias=False)
            nn.init.zeros_(module.map_augment.weight)
        elif module.map_augment.in_features != dim:
            raise UserError(f"the teacher's U-Net takes {module.map_augment.in_features}-dim augmentation labels; "
                            f"--augment gives EDM's {dim}: use --augment 0 with this teacher")


def check_compatible(generator: nn.Module, teacher: nn.Module, generator_name: str, teacher_name: str) -> None:
    """Teacher and generator must agree on image shape and labels; say exactly what differs."""
    problems = []
    g_shape, t_shape = tuple(generator.data_shape), tuple(teacher.data_shape)
    if g_shape[1:] != t_shape[1:]:
        hint = " (add --resize-to-teacher to area-downsample)" if g_shape[1] % t_shape[1] == 0 else ""
        problems.append(f"resolution: generator {g_shape[1]}x{g_shape[2]}, teacher {t_shape[1]}x{t_shape[2]}"
                        + hint)
    if g_shape[0] != t_shape[0]:
        problems.append(f"channels: generator {g_shape[0]}, teacher {t_shape[0]}")
    if generator.c_dim != teacher.label_dim:
        describe = lambda n: f"conditional with {n} classes" if n else "unconditional"  # noqa: E731
        problems.append(f"labels: generator {describe(generator.c_dim)}, teacher {describe(teacher.label_dim)}")
    if problems:
        raise UserError(f"generator {generator_name} and teacher {teacher_name} do not fit together: "
                        + "; ".join(problems) + ". Use a teacher trained on the generator's data")


def _series(log: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["kimg"], r[key]) for r in log if key in r]
    return ([p[0] for p in points], [p[1] for p in points])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

