"""What every image job (refine, distill, demo) does around the loop: the run directory, before/after
grids of the same seeds, metrics before the first step and after the last (and at snapshots when asked:
then metrics.jsonl holds every measurement, from step 0 to the last, and the report draws them), the
generator written in its native format at every snapshot, the report, and where the wall time went.

Under torchrun every process trains; rank 0 alone prepares the run directory, computes grids and
metrics and writes files (the others wait for it in the loop's next collective)."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from fileformats.atomic import append_text
from gan_adapters.base import seeded_global_rng
from gan_adapters.writeback import WriteBack
from metrics.evaluate import generated_batches
from metrics.images import quantize, save_image_grid
from metrics.report import write_report
from refiner import distributed as dist
from refiner.augment import AUGMENT_DIM
from refiner.config import TrainConfig
from refiner.loop import Trainer
from refiner.realdata import RealData
from refiner.rundir import RunDir, open_run, read_jsonl
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
    writer: WriteBack  # names and writes the generator's EMA in its native format at every snapshot
    evaluate: Evaluator | None = None
    metrics_at_snapshots: bool = False
    evaluate_at_snapshots: Evaluator | None = None  # the measurement at snapshots, if not `evaluate` (cheaper)
    grid_seeds: int = 64
    snapshot_grids: bool = False  # also write grid-NNNNNNNNN.png (images seen) of the fixed seeds at every snapshot
    title: str = "Diff-Instruct refinement"
    info: dict[str, Any] = field(default_factory=dict)
    echo: Callable[[str], None] = print
    inputs: tuple[str, ...] = ()  # the command's input files: starting over in `out` must not delete them
    real_data: RealData | None = None  # real images for the adversarial losses (--data)
    reference_grids: dict[str, np.ndarray] = field(default_factory=dict)  # uint8 images shown beside the
    # before/after grids, e.g. {"teacher samples": ...}; with real_data, "real images" are drawn from it

    nimg: int = field(default=0, init=False)  # images seen at the latest snapshot
    ema: nn.Module | None = field(default=None, init=False)  # the generator's EMA once `run` has trained
    seconds: dict[str, float] = field(default_factory=dict, init=False)  # wall time by part: scoring (every
    # metric measurement), training (the loop without them), report (grids and report)

    @property
    def output_path(self) -> Path:
        """The latest output (the file of the latest snapshot when the writer names one per snapshot)."""
        return self.writer.path(self.out, self.nimg)

    def run(self, resume: bool = False, force: bool = False) -> dict[str, Any]:
        """Prepare and lock the run directory, train, write the outputs; the lock is released on any exit."""
        self.config = self.config.for_device(self.device)  # config.json records the precision auto chose
        with open_run(self.out, self.config, resume=resume, force=force, inputs=self.inputs,
                      echo=self.echo) as (run, checkpoint):
            return self._run(run, checkpoint)

    def _run(self, run: RunDir, checkpoint: Path | None) -> dict[str, Any]:
        trainer = Trainer(self.config, self.generator, self.teacher, self.fake, run, self.device,
                          on_snapshot=(self._snapshot,), echo=self.echo, real_data=self.real_data)
        main = dist.rank() == 0
        before = self._before(run, trainer.ema) if main else None
        if checkpoint is not None:
            trainer.resume(checkpoint)
            if main and not self.writer.path(self.out, trainer.counters.nimg).exists():  # killed before the snapshot
                with seeded_global_rng(self.config.seed, "snapshot", self.device):
                    self._snapshot(trainer)
        counted, start = sum(self.seconds.values()), time.perf_counter()
        trainer.train()  # its snapshots' metrics and grids count as scoring and report
        self._add_seconds("training", time.perf_counter() - start - (sum(self.seconds.values()) - counted))
        self.ema = trainer.ema
        if not main:
            return {"steps": trainer.counters.step}
        with seeded_global_rng(self.config.seed, "after", self.device):
            after = self._measure(trainer.ema, "after")
        if self.metrics_at_snapshots and after:
            self._record_metrics(trainer.counters.step, trainer.counters.nimg, after)
        with self._timed("report"):
            grid_after = self._grid(trainer.ema)
            save_image_grid(grid_after, self.out / "grid-after.png")
            log = run.read_log()
            curves = {"loss": {"generator": _series(log, "loss_gen"), "fake score": _series(log, "loss_fake")},
                      "gradient norm": {"generator": _series(log, "grad_norm_gen"),
                                        "fake score": _series(log, "grad_norm_fake")}}
            write_report(self.out, before["metrics"], after, grid_before=before["grid"], grid_after=grid_after,
                         reference_grids=self._reference_grids(), curves=curves,
                         metric_curves=self._metric_curves(after), title=self.title,
                         info={**self.info, "steps": trainer.counters.step, "kimg": trainer.counters.nimg / 1000,
                               "skipped steps": trainer.counters.skipped_generator + trainer.counters.skipped_fake,
                               "output": self.output_path})
        return {"before": before["metrics"], "after": after, "steps": trainer.counters.step,
                "output": str(self.output_path), "seconds": dict(self.seconds)}

    # -- pieces ------------------------------------------------------------------------------------
    def _before(self, run: RunDir, generator: nn.Module) -> dict[str, Any]:
        """Grid and metrics of the untrained generator, computed once and kept in the run directory."""
        def compute() -> dict[str, Any]:
            with self._timed("report"):
                grid = self._grid(generator)
                save_image_grid(grid, run.path / "grid-before.png")
            with seeded_global_rng(self.config.seed, "before", self.device):
                metrics = self._measure(generator, "before")
            if self.metrics_at_snapshots and metrics:
                self._record_metrics(0, 0, metrics)
            return {"grid": grid, "metrics": json.dumps(metrics)}

        stored = run.kept("before.npz", compute)
        return {"grid": stored["grid"], "metrics": json.loads(str(stored["metrics"]))}

    def _grid(self, generator: nn.Module) -> np.ndarray:
        return torch.cat(list(generated_batches(generator, self.grid_seeds, batch_size=16, seed=0))).numpy()

    def _measure(self, generator: nn.Module, when: str, evaluate: Evaluator | None = None) -> dict[str, float]:
        evaluate = evaluate or self.evaluate
        if evaluate is None:
            return {}
        self.echo(f"metrics {when}:")
        was_training = generator.training
        with self._timed("scoring"):
            result = evaluate(generator.eval())
        generator.train(was_training)
        self.echo("  " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    def _record_metrics(self, step: int, nimg: int, metrics: dict[str, float]) -> None:
        append_text(self.out / "metrics.jsonl", json.dumps({"step": step, "kimg": nimg / 1000, **metrics}) + "\n")

    def metric_records(self) -> list[dict[str, float]]:
        """metrics.jsonl: {step, kimg, metric: value, ...}, one record per step (the latest: a resumed run
        may have measured a step twice)."""
        return list({r["step"]: r for r in read_jsonl(self.out / "metrics.jsonl")}.values())

    def _metric_curves(self, after: dict[str, float]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
        """metric -> {metric: (kimg, values)} from metrics.jsonl."""
        records = self.metric_records()
        curves = {}
        for name in after:
            points = [(r["kimg"], r[name]) for r in records if name in r]
            if points:
                curves[name] = {name: tuple(map(list, zip(*points)))}
        return curves

    def _reference_grids(self) -> dict[str, np.ndarray]:
        """The given reference grids, and with real_data its first images (a fixed draw, not the loop's)."""
        grids = dict(self.reference_grids)
        if self.real_data is not None and "real images" not in grids:
            images, _ = self.real_data.draw(self.grid_seeds, torch.Generator().manual_seed(0))
            grids["real images"] = quantize(images.float().cpu()).numpy()
        return grids

    @contextlib.contextmanager
    def _timed(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._add_seconds(part, time.perf_counter() - start)

    def _add_seconds(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    def _snapshot(self, trainer: Trainer) -> None:
        self.nimg = trainer.counters.nimg
        self.writer.save(trainer.ema, self.output_path)
        if self.snapshot_grids:
            with self._timed("report"):
                save_image_grid(self._grid(trainer.ema), self.out / f"grid-{self.nimg:09d}.png")
        # the last step's record is the measurement 'after' (measured next: once is enough)
        if self.metrics_at_snapshots and self.evaluate is not None and trainer.counters.step < self.config.steps:
            metrics = self._measure(trainer.ema, f"at step {trainer.counters.step}", self.evaluate_at_snapshots)
            self._record_metrics(trainer.counters.step, trainer.counters.nimg, metrics)


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

