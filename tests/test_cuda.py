"""The loop's CUDA paths: mixed precision (bf16, and fp16 with one loss scaler per loss), the teacher in
half precision, the non-finite guard under loss scaling, and `refiner distill` on a GPU.

Skipped without CUDA; on a GPU machine: `pytest tests/test_cuda.py`. The teacher is the small EDM
fixture (EDMPrecond + DDPM++, 16x16, 10 classes); the generator and fake score are copies of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gan_adapters.loader import load_generator
from gan_adapters.onestep import OneStepGenerator
from refiner.cli import cli
from refiner.config import TrainConfig
from refiner.jobs import trainable_copy
from refiner.loop import Trainer
from refiner.rundir import RunDir
from teachers.edm_loader import load_teacher
from tests.helpers import DATA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEACHER = DATA / "edm-small-ddpmpp-edm-cond.pkl"
CUDA = torch.device("cuda")


def _trainer(tmp: Path, precision: str, teacher_dtype: str | None, steps: int = 6, **options) -> Trainer:
    torch.manual_seed(0)
    teacher = load_teacher(TEACHER, device=CUDA, dtype=teacher_dtype)
    generator = OneStepGenerator.from_teacher(teacher, sigma_init=1.0).train()
    config = TrainConfig(steps=steps, batch=32, lr=1e-4, fake_lr=1e-4, betas=(0.0, 0.999), ema=0.0,
                         precision=precision, device="cuda", log_every=1, **options)
    run = RunDir(tmp / f"{precision}-{len(list(tmp.iterdir()))}")
    run.prepare(config)
    return Trainer(config, generator, teacher, trainable_copy(teacher), run, CUDA, echo=lambda s: None)


def _delta(trainer: Trainer, start: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach().float() - start[k]).flatten()
                      for k, p in trainer.generator.named_parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_follows_fp32(tmp_path: Path, precision: str):
    """k steps in bf16/fp16 (teacher in the same half precision) move the generator's weights the way
    fp32 does: the update directions agree (cosine > 0.9) and their sizes within 20%."""
    deltas, dtypes = {}, {}
    for p, teacher_dtype in (("fp32", None), (precision, precision)):
        trainer = _trainer(tmp_path, p, teacher_dtype)
        start = {k: v.detach().float().clone() for k, v in trainer.generator.named_parameters()}
        seen: set[torch.dtype] = set()
        hook = trainer.teacher.network.model.register_forward_hook(lambda m, i, o, seen=seen: seen.add(o.dtype))
        counters = trainer.train()
        hook.remove()
        assert counters.skipped_generator == counters.skipped_fake == 0
        deltas[p], dtypes[p] = _delta(trainer, start), seen
        assert torch.isfinite(deltas[p]).all()
    assert dtypes == {"fp32": {torch.float32}, precision: {getattr(torch, {"bf16": "bfloat16",
                                                                             "fp16": "float16"}[precision])}}
    a, b = deltas["fp32"], deltas[precision]
    assert a.norm() > 0
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
    assert abs(b.norm() / a.norm() - 1) < 0.2


def test_cudnn_benchmark_is_set_by_the_config_and_keeps_the_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--cudnn-benchmark (on by default) switches cuDNN's autotuner for the run; the fp32 update it gives is the
    heuristic algorithms' to float rounding (Adam's first steps amplify rounding where a gradient is near 0, hence
    the direction and size of the whole update are compared)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    deltas = {}
    for on in (False, True):
        trainer = _trainer(tmp_path, "fp32", None, steps=3, cudnn_benchmark=on)
        assert torch.backends.cudnn.benchmark is on
        start = {k: v.detach().float().clone() for k, v in trainer.generator.named_parameters()}
        trainer.train()
        deltas[on] = _delta(trainer, start)
    a, b = deltas[False], deltas[True]
    assert a.norm() > 0
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98
    assert abs(b.norm() / a.norm() - 1) < 0.05
    assert TrainConfig().cudnn_benchmark


class _NaNTeacher(torch.nn.Module):
    """Wraps a teacher and returns NaN everywhere (every generator step must be skipped)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sigma_data = inner, inner.sigma_data

    def forward(self, x, sigma, labels=None):
        return torch.full_like(self.inner(x, sigma, labels), float("nan"))


def test_fp16_guard_and_separate_loss_scalers(tmp_path: Path):
    trainer = _trainer(tmp_path, "fp16", "fp16")
    good = trainer.teacher
    scale = {name: s.get_scale() for name, s in trainer.scalers.items()}
    before = {k: v.detach().clone() for k, v in trainer.generator.state_dict().items()}
    trainer.teacher = _NaNTeacher(good)
    for _ in range(3):
        trainer.generator_step()
    after = trainer.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing reached the weights
    assert trainer.counters.skipped_generator == 3
    assert trainer.scalers["generator"].get_scale() == scale["generator"] / 8  # backed off once per step
    assert trainer.scalers["fake"].get_scale() == scale["fake"]  # the fake's scale is its own
    trainer.teacher = good
    trainer.fake_step()
    trainer.generator_step()
    assert trainer.counters.skipped_generator == 3
    assert any(not torch.equal(before[k], v) for k, v in trainer.generator.state_dict().items())
    assert all(torch.isfinite(p).all() for p in trainer.generator.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_distill_cli_on_cuda(tmp_path: Path, precision: str):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(TEACHER), "--out", str(out), "--device", "cuda",
                                      "--preset", "cifar10-cond", "--precision", precision, "--batch", "16",
                                      "--steps", "4", "--lr", "1e-4", "--fake-lr", "1e-4", "--grid-seeds", "4",
                                      "--log-every", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["peak_cuda_mb"] > 0 and math.isfinite(r["loss_fake"]) and math.isfinite(r["loss_gen"]) for r in log)
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == precision
    G = load_generator(out / "network-snapshot-000000064.pkl")  # written from the run (4 x 16 images), read on the CPU
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = G.eval()(G.sample_latents(4, rng), G.sample_labels(4, rng))
    assert torch.isfinite(images).all() and images.std() > 0
