"""`refiner metrics` with a stand-in detector and generator, and the before/after report."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from metrics_helpers import StandInDetector, TinyGenerator, random_images, write_folder

import refiner.cli.metrics as cli_metrics
from metrics.evaluate import evaluate
from metrics.images import image_grid
from metrics.plots import line_plot, nice_ticks
from metrics.report import compare, fmt, write_report
from refiner.cli import cli


@pytest.fixture
def sets(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_metrics, "_load_detector", lambda source, frontend, device: StandInDetector(
        frontend=frontend))
    a = tmp_path / "a.npz"
    np.savez(a, x=random_images(40, seed=1))
    b = write_folder(tmp_path / "b", random_images(40, seed=2, offset=20))
    return a, b


def _run(*args: str):
    return CliRunner().invoke(cli, ["metrics", *args])


def test_cli_images_json(sets):
    a, b = sets
    result = _run("--images", str(a), "--ref", str(b), "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out) == {"fid", "is_mean", "is_std"}  # default fid,is
    expected = evaluate(a, StandInDetector(), "fid,is", ref=b)
    assert out == pytest.approx(expected, rel=1e-9)

    result = _run("--images", str(a), "--ref", str(b), "--json", "--metrics", "fid,is,kid",
                  "--fid-method", "eig")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out) == {"fid", "is_mean", "is_std", "kid"} and out["fid"] == pytest.approx(expected["fid"])

    result = _run("--images", str(a), "--ref", str(b), "--metrics", "fid")
    assert result.exit_code == 0 and re.fullmatch(r"FID  \d+\.\d{4}\n", result.output)


def test_cli_default_leaves_is_out_without_classifier(sets, monkeypatch):
    a, b = sets
    monkeypatch.setattr(cli_metrics, "_load_detector", lambda *args: StandInDetector(logits=False))
    result = _run("--images", str(a), "--ref", str(b), "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"fid"} and "IS is left out" in result.stderr
    result = _run("--images", str(a), "--ref", str(b), "--metrics", "fid,is")
    assert result.exit_code == 2 and "no classifier head" in result.output


def test_cli_mu_sigma_reference(sets, tmp_path, monkeypatch):
    a, _ = sets
    np.savez(tmp_path / "ref.npz", mu=np.zeros(16), sigma=np.eye(16))
    result = _run("--images", str(a), "--ref", str(tmp_path / "ref.npz"), "--metrics", "fid", "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)) == {"fid"}
    monkeypatch.setattr(cli_metrics, "_load_detector", lambda *args: pytest.fail("loaded before --ref was checked"))
    result = _run("--images", str(a), "--ref", str(tmp_path / "ref.npz"), "--metrics", "kid")
    assert result.exit_code == 2 and "KID needs reference features" in result.output


@pytest.mark.parametrize("command", ["refine", "distill"])
def test_training_commands_refuse_a_bad_reference_before_loading_networks(command, tmp_path, monkeypatch):
    """--metrics with a --ref that is missing, or mu/sigma only for KID: refused before the detector, the
    teacher or the generator is loaded, and before the run folder exists."""
    import metrics.detector
    import teachers.edm_loader

    for module, name in ((metrics.detector, "load_detector"), (teachers.edm_loader, "load_teacher")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: pytest.fail("loaded before --ref was checked"))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(16), sigma=np.eye(16))
    from helpers import DATA

    net = ["--generator", str(DATA / "sg2ada-small-uncond.pkl")] if command == "refine" else []
    teacher = str(DATA / "edm-small-ddpmpp-edm-cond.pkl")
    for ref, metric, message in ((tmp_path / "missing.npz", "fid10", "no such file or folder"),
                                 (tmp_path / "stats.npz", "kid10", "KID needs reference features")):
        result = CliRunner().invoke(cli, [command, *net, "--teacher", teacher, "--out", str(tmp_path / "run"),
                                          "--metrics", metric, "--ref", str(ref), "--device", "cpu"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_cli_generator(sets, monkeypatch):
    _, b = sets
    loaded = []
    monkeypatch.setattr(cli_metrics, "_load_generator",
                        lambda src, device, options: loaded.append(src) or TinyGenerator())
    result = _run("--generator", "net.pkl", "--ref", str(b), "--metrics", "fid100_full,is50,kid60", "--json")
    assert result.exit_code == 0, result.output
    assert loaded == ["net.pkl"]
    out = json.loads(result.output)
    expected = evaluate(TinyGenerator(), StandInDetector(), "fid100,is50,kid60", ref=b)
    assert out == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--metrics", "fud"], "unknown metric 'fud'"),
    (["--metrics", "fid,is", "--no-ref"], "need --ref"),
    (["--generator", "g.pkl"], "exactly one of --images"),
    (["--no-images"], "exactly one of --images"),
])
def test_cli_errors(sets, args, message):
    a, b = sets
    base = ["--images", str(a), "--ref", str(b)]
    if "--no-ref" in args:
        base, args = base[:2], [x for x in args if x != "--no-ref"]
    if "--no-images" in args:
        base, args = base[2:], []
    result = _run(*base, *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_report_json_and_html(tmp_path):
    before = {"fid": 2.92, "is_mean": 9.83, "is_std": 0.1, "kid": 0.00123}
    after = {"fid": 2.71, "is_mean": 9.7, "is_std": 0.12, "kid": 0.00101}
    grid_b, grid_a = random_images(6, seed=1), random_images(6, seed=2)
    curves = {"loss": {"generator": ([0, 1, 2], [1.0, 0.6, float("nan")]),
                       "fake score": ([0, 2], [0.3, 0.2])},
              "FID": {"fid": ([0, 2], [2.92, 2.71])}}
    json_path, html_path = write_report(tmp_path / "run", before, after, grid_before=grid_b,
                                        grid_after=grid_a.transpose(0, 3, 1, 2), curves=curves,
                                        info={"generator": "<net>.pkl"})
    data = json.loads(json_path.read_text())
    rows = {r["metric"]: r for r in data["metrics"]}
    assert rows["fid"]["change"] == pytest.approx(-0.21) and rows["fid"]["change_pct"] == pytest.approx(
        -0.21 / 2.92 * 100)
    assert rows["fid"]["better"] is True and rows["is_mean"]["better"] is False
    assert rows["is_std"]["better"] is None
    assert data["curves"]["loss"]["generator"]["y"] == [1.0, 0.6, None]

    page = html_path.read_text()
    for v in (2.92, 2.71, 9.83, 9.7, 0.00123, 0.00101):
        assert fmt(v) in page
    assert "+0.2100" not in page and "-0.2100" in page and "-7.19%" in page
    assert "&lt;net&gt;.pkl" in page and "<net>" not in page
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(uris) == 4  # two grids, two plots
    first = PIL.Image.open(io.BytesIO(base64.b64decode(uris[0])))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(image_grid(grid_b)))
    assert "http" not in page  # self-contained: nothing fetched


def test_compare_handles_missing_values():
    rows = compare({"fid": 3.0}, {"fid": 3.0, "is_mean": 5.0})
    assert rows[0]["change"] == 0 and rows[0]["better"] is None
    assert rows[1] == dict(metric="is_mean", before=None, after=5.0, change=None, change_pct=None,
                           better=None)


def test_compare_knows_which_way_is_better():
    rows = compare({"fid": 3.0, "fd": 67.0, "cs": 2.9, "is_mean": 5.0},
                   {"fid": 4.0, "fd": 45.3, "cs": 3.2, "is_mean": 4.0})
    assert {r["metric"]: r["better"] for r in rows} == {"fid": False, "fd": True, "cs": True, "is_mean": False}


def test_line_plot_and_ticks():
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0.0012, 0.0019) == [0.0012, 0.0014, 0.0016, 0.0018]
    assert nice_ticks(-3, 47) == [0, 10, 20, 30, 40]
    img = line_plot({"a": ([0, 1, 2], [0, 1, 4]), "b": ([1], [2])}, title="t", xlabel="x", ylabel="y")
    assert img.size == (640, 400) and img.mode == "RGB"
    pixels = np.asarray(img).reshape(-1, 3)
    blue = np.array([0x1F, 0x77, 0xB4])
    assert (np.abs(pixels.astype(int) - blue).sum(1) < 30).sum() > 100  # the first line is drawn
    empty = line_plot({"a": ([], [])})
    assert np.asarray(empty).min() < 255  # axes and "no data", no exception
