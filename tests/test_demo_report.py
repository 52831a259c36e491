"""The report's reference grids (teacher samples, real images) and its metric-during-training curves as inline
SVG; the demo's FD at every quarter of training, its wall-time split and its default thread count."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import pytest
import torch
from click.testing import CliRunner

from metrics.images import image_grid
from metrics.plots import PlotStyle, svg_line_plot
from metrics.report import write_report
from refiner.cli import cli
from refiner.config import TrainConfig
from refiner.demo.runner import JOBS, default_threads, demo_config, run_demo, with_curve_snapshots
from tests.helpers import DATA


def _polylines(page: str) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, p.split(","))) for p in points.split()]
            for points in re.findall(r"<polyline [^>]*points='([^']*)'", page)]


def _pngs(page: str) -> dict[str, np.ndarray]:
    """figcaption -> decoded image of every grid in a report page."""
    found = re.findall(r"<figcaption>([^<]*)</figcaption><img class='grid' alt='[^']*' "
                       r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    return {name: np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(data)))) for name, data in found}


def test_svg_line_plot_places_every_finite_point_and_breaks_at_nan():
    style = PlotStyle(width=200, height=100, margin_left=10, margin_right=10, margin_top=10, margin_bottom=10)
    svg = svg_line_plot({"fd": ([0, 1, 2, 3], [10, 8, math.nan, 4])}, title="t", style=style)
    # by hand: x range [0, 3] padded by 5% -> [-0.15, 3.15] over pixels 10..190; y [4, 10] -> [3.7, 10.3]
    # over pixels 90..10 (upwards)
    px = lambda x: 10 + (x + 0.15) / 3.3 * 180  # noqa: E731
    py = lambda y: 90 - (y - 3.7) / 6.6 * 80  # noqa: E731
    expected = [[(px(0), py(10)), (px(1), py(8))], [(px(3), py(4))]]
    lines = _polylines(svg)
    assert [len(line) for line in lines] == [2, 1]
    for line, want in zip(lines, expected):
        np.testing.assert_allclose(line, want, atol=0.06)  # written with one decimal
    assert svg.count("<circle") == 3 and svg.startswith("<svg") and svg.endswith("</svg>")
    assert "no data" in svg_line_plot({"fd": ([0], [math.nan])})


def test_report_shows_reference_grids_and_metric_curves(tmp_path: Path):
    rng = np.random.default_rng(0)
    grids = {name: rng.integers(0, 256, (9, 1, 8, 8), dtype=np.uint8) for name in ("b", "a", "teacher", "real")}
    kimg, fd = [0, 0.16, 0.32, 0.48, 0.64], [68.4, 62.5, 60.1, 56.2, 54.0]
    _, html_path = write_report(tmp_path, {"fd": 68.4}, {"fd": 54.0}, grid_before=grids["b"], grid_after=grids["a"],
                                reference_grids={"teacher samples": grids["teacher"], "real images": grids["real"]},
                                curves={"loss": {"generator": ([0, 1], [1.0, 0.5])}},
                                metric_curves={"fd": {"fd": (kimg, fd)}})
    page = html_path.read_text()
    shown = _pngs(page)
    assert list(shown) == ["before", "after", "teacher samples", "real images"]
    for name, key in (("before", "b"), ("teacher samples", "teacher"), ("real images", "real")):
        np.testing.assert_array_equal(shown[name], np.asarray(image_grid(grids[key])))
    assert "<h2>Metrics during training</h2>" in page and "domain FD during training" in page
    (line,) = _polylines(page)
    assert len(line) == len(fd)
    assert [x for x, _ in line] == sorted(x for x, _ in line)  # kimg grows to the right
    ys = [y for _, y in line]  # pixels grow downwards: the falling FD climbs
    assert ys == sorted(ys)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["curves"]["fd"]["fd"] == {"x": kimg, "y": fd} and "loss" in data["curves"]

    _, html_path = write_report(tmp_path / "plain", {"fd": 1.0}, {"fd": 0.5})
    assert "<svg" not in html_path.read_text() and "Metrics during training" not in html_path.read_text()


def _demo(out: Path, steps: int) -> dict:
    """A short demo run (two fake warm-up steps instead of 20) as `refiner demo --json` prints it."""
    config = replace(JOBS["refine"], steps=steps, batch=4, fake_warmup=2)
    return json.loads(json.dumps(run_demo(out, config=config, samples=20, echo=lambda m: None).to_json()))


def test_demo_measures_fd_at_every_quarter_and_splits_its_time(tmp_path: Path):
    r = _demo(tmp_path / "run", 4)
    curve = r["fd_during_training"]
    assert [p["step"] for p in curve] == [0, 1, 2, 3, 4] and {p["samples"] for p in curve} == {20}
    assert curve[0]["fd"] == r["fd_before"] and curve[-1]["fd"] == r["fd_after"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["fd"] for rec in records] == [p["fd"] for p in curve]  # the last step measured once
    # independent truth: a run stopped after two steps ends where this one was at step 2 (same latents,
    # same samples, the same trajectory: snapshot measurements do not move the training's randomness)
    assert _demo(tmp_path / "short", 2)["fd_after"] == pytest.approx(curve[2]["fd"], rel=1e-9)

    page = (tmp_path / "run" / "report.html").read_text()
    fd_line, _ = _polylines(page)  # fd, then cs
    assert len(fd_line) == len(curve)
    shown = _pngs(page)
    assert "teacher (18-step Heun)" in shown
    assert ("real test images" in shown) == (r["floor_source"] == "live")

    split = r["seconds_by_part"]
    assert set(split) == {"loading", "scoring", "training", "report", "setup"} and min(split.values()) >= 0
    assert sum(split.values()) == pytest.approx(r["seconds"], abs=0.05)
    assert split["training"] > 0 and split["scoring"] > 0
    assert r["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("physical, usable, busy, expected", [
    (8, 8, 0.2, 4),  # an idle laptop: capped at 4
    (2, 2, 0.0, 2),  # an idle two-core machine
    (2, 2, 3.0, 1),  # a busy shared machine
    (8, 8, 5.6, 2),  # the idle cores, rounded
    (8, 2, 0.0, 2),  # a process allowed two CPUs (taskset, containers)
])
def test_default_threads_are_the_idle_physical_cores(physical, usable, busy, expected):
    assert default_threads(physical, usable, busy) == expected


def test_default_threads_measure_the_cores_busy_now(monkeypatch: pytest.MonkeyPatch):
    """Not the load average (minutes behind): a machine busy until a moment ago counts as idle."""
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 0.0 if interval else 100.0)
    assert default_threads(usable_cpus=2) == 2
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 100.0 if interval else 0.0)
    assert default_threads(usable_cpus=2) == 1


@pytest.mark.parametrize("job, given, reuse_pass, fake_sigma", [
    ("refine", {}, True, "same"),  # the refinement's speed default
    ("refine", {"loss": "ikl"}, True, "same"),
    ("refine", {"loss": "sida"}, False, "lognormal"),  # trains a discriminator: sid's own σ, no shared pass
    ("refine", {"fake_sigma": "lognormal"}, False, "lognormal"),  # the user's choice wins
    ("refine", {"reuse_pass": False}, False, "lognormal"),
    ("refine", {"reuse_images": True}, False, "lognormal"),  # the two reuse options exclude each other
    ("refine", {"p_mean": 0.5}, False, "lognormal"),  # an option of the fake step's own σ sampler
    ("distill", {}, False, "same"),  # the distillation keeps separate passes
])
def test_demo_speed_defaults_apply_where_the_run_allows_them(job, given, reuse_pass, fake_sigma):
    config = demo_config(job, given)
    assert config.reuse_pass is reuse_pass and config.fake_sigma == fake_sigma
    assert (config.sources["reuse_pass"] == "demo: speed") is reuse_pass


def test_curve_snapshots_every_quarter_unless_set():
    assert with_curve_snapshots(TrainConfig(steps=600)).snapshot_every == 150
    assert with_curve_snapshots(TrainConfig(steps=150)).snapshot_every == 38  # 38, 76, 114, then the end
    assert with_curve_snapshots(TrainConfig(steps=150)).sources["snapshot_every"].startswith("demo")
    assert with_curve_snapshots(TrainConfig(steps=600, snapshot_every=7)).snapshot_every == 7
    assert with_curve_snapshots(TrainConfig(steps=1)).snapshot_every == 0


def _dataset_zip(path: Path, values: tuple[int, ...]) -> Path:
    """16x16 RGB images, image i all of grey value values[i], class 0."""
    with zipfile.ZipFile(path, "w") as z:
        names = []
        for i, v in enumerate(values):
            buf = io.BytesIO()
            PIL.Image.fromarray(np.full((16, 16, 3), v, np.uint8)).save(buf, format="PNG")
            names.append(f"img{i}.png")
            z.writestr(names[-1], buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[n, 0] for n in names]}))
    return path


def test_distill_report_shows_the_real_images_of_data(tmp_path: Path):
    values = (0, 40, 80, 120, 160, 200)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(DATA / "edm-small-ddpmpp-edm-cond.pkl"),
                                      "--out", str(out), "--batch", "2", "--device", "cpu", "--grid-seeds", "4",
                                      "--steps", "1", "--loss", "dmd2",
                                      "--data", str(_dataset_zip(tmp_path / "d.zip", values))])
    assert result.exit_code == 0, result.output
    real = _pngs((out / "report.html").read_text())["real images"]
    assert real.shape[:2] == (32, 32)  # 4 images of 16x16 in a 2x2 grid
    tiles = [real[r:r + 16, c:c + 16] for r in (0, 16) for c in (0, 16)]
    for tile in tiles:  # each a whole image of the data set, not a generated one
        assert tile.min() == tile.max() and min(abs(int(tile.min()) - v) for v in values) <= 1
