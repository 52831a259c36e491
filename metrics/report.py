"""The before / after report: `report.json` (numbers) and a self-contained `report.html` (table, image grids
of the same seeds before and after beside the teacher's samples and real images when the run has them, the
metrics measured during training as inline SVG curves, the training curves; every image inlined as a
base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import PIL.Image

from fileformats.atomic import atomic_write_text
from metrics.images import ImageArray, image_grid
from metrics.plots import Series, line_plot, svg_line_plot

# +1: higher is better, -1: lower is better, 0: neither (spread)
DIRECTION = {"fid": -1, "kid": -1, "is_mean": +1, "is_std": 0, "fd": -1, "cs": +1}
LABELS = {"fid": "FID", "kid": "KID", "is_mean": "IS", "is_std": "IS std", "fd": "domain FD",
          "cs": "classifier score"}  # fd, cs: the demo's metrics on a domain classifier (metrics/classifier.py)


def _finite(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def compare(before: Mapping[str, float], after: Mapping[str, float]) -> list[dict]:
    """One row per metric present on either side: before, after, change = after - before, change_pct =
    100 * change / |before|, better = True / False / None (unknown direction or missing value)."""
    names = dict.fromkeys([*(k for k in DIRECTION if k in before or k in after), *before, *after])
    rows = []
    for name in names:
        b, a = _finite(before.get(name)), _finite(after.get(name))
        change = a - b if a is not None and b is not None else None
        pct = 100 * change / abs(b) if change is not None and b else None
        sign = DIRECTION.get(name, 0)
        better = (change * sign > 0) if change is not None and sign and change != 0 else None
        rows.append(dict(metric=name, before=b, after=a, change=change, change_pct=pct, better=better))
    return rows


def fmt(v: float | None) -> str:
    """How a number appears in the report table."""
    if v is None:
        return "&ndash;"
    return f"{v:.4f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3e}"


def _png_data_uri(img: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}
.better{color:#1a7f37}.worse{color:#c62828}.grids{display:flex;gap:2em;flex-wrap:wrap}
figure{margin:0}figcaption{text-align:center;font-weight:bold}
img.grid{image-rendering:pixelated;width:min(480px,90vw)}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dt{font-weight:bold}"""


def _html(title: str, info: Mapping[str, object], rows: list[dict], grids: dict[str, str],
          plots: dict[str, str], svgs: dict[str, str]) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    if info:
        out.append("<dl>" + "".join(f"<dt>{e(str(k))}</dt><dd>{e(str(v))}</dd>" for k, v in info.items())
                   + "</dl>")
    if rows:
        out.append("<h2>Metrics</h2><table><tr><th>metric</th><th>before</th><th>after</th><th>change</th>"
                   "<th>change %</th></tr>")
        for r in rows:
            cls = {True: " class='better'", False: " class='worse'"}.get(r["better"], "")
            pct = "&ndash;" if r["change_pct"] is None else f"{r['change_pct']:+.2f}%"
            change = fmt(r["change"]) if r["change"] is None or r["change"] < 0 else "+" + fmt(r["change"])
            out.append(f"<tr{cls}><td>{e(LABELS.get(r['metric'], r['metric']))}</td><td>{fmt(r['before'])}"
                       f"</td><td>{fmt(r['after'])}</td><td>{change}</td><td>{pct}</td></tr>")
        out.append("</table>")
    if grids:
        out.append("<h2>Samples (before and after: the same seeds)</h2><div class='grids'>")
        out += [f"<figure><figcaption>{e(k)}</figcaption><img class='grid' alt='{e(k)}' src='{uri}'></figure>"
                for k, uri in grids.items()]
        out.append("</div>")
    if svgs:
        out.append("<h2>Metrics during training</h2><div class='grids'>")
        out += [f"<figure class='metric-curve'>{svg}</figure>" for svg in svgs.values()]
        out.append("</div>")
    if plots:
        out.append("<h2>Curves</h2>")
        out += [f"<figure><img alt='{e(k)}' src='{uri}'></figure>" for k, uri in plots.items()]
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(out_dir: str | os.PathLike, before: Mapping[str, float], after: Mapping[str, float], *,
                 grid_before: ImageArray | None = None, grid_after: ImageArray | None = None,
                 reference_grids: Mapping[str, ImageArray] | None = None,
                 curves: Mapping[str, Series] | None = None, metric_curves: Mapping[str, Series] | None = None,
                 xlabel: str = "kimg",
                 title: str = "Diff-Instruct refinement", info: Mapping[str, object] | None = None
                 ) -> tuple[Path, Path]:
    """Write `report.json` and `report.html` into `out_dir` (atomically); returns their paths.

    before / after: metric dicts as `evaluate` returns them. grid_before / grid_after: uint8 images
    [N, C, H, W] or [N, H, W, C] of the same seeds. reference_grids: caption -> uint8 images shown beside
    them (e.g. "teacher samples", "real images"). curves: plot title -> {line name: (xs, ys)}, e.g.
    {"loss": {"generator": (kimg, loss_g), "fake score": (kimg, loss_f)}, "FID": {"fid": (kimg, fid)}}, drawn
    as images; metric_curves: the same for metrics measured during training, drawn as inline SVG (one dot per
    measurement). info: free key/value lines shown at the top (sources, settings)."""
    out_dir = Path(out_dir)
    info, curves, metric_curves = dict(info or {}), dict(curves or {}), dict(metric_curves or {})
    rows = compare(before, after)
    grids = {name: _png_data_uri(image_grid(images)) for name, images in
             (("before", grid_before), ("after", grid_after), *(reference_grids or {}).items())
             if images is not None}
    plots = {name: _png_data_uri(line_plot(series, title=name, xlabel=xlabel, ylabel=name))
             for name, series in curves.items()}
    svgs = {name: svg_line_plot(series, title=f"{LABELS.get(name, name)} during training", xlabel=xlabel,
                                ylabel=LABELS.get(name, name)) for name, series in metric_curves.items()}
    data = dict(title=title, info={k: str(v) for k, v in info.items()}, metrics=rows,
                curves={name: {line: dict(x=[_finite(x) for x in xs], y=[_finite(y) for y in ys])
                               for line, (xs, ys) in series.items()}
                        for name, series in {**curves, **metric_curves}.items()})
    json_path = atomic_write_text(out_dir / "report.json", json.dumps(data, indent=2) + "\n")
    html_path = atomic_write_text(out_dir / "report.html", _html(title, info, rows, grids, plots, svgs))
    return json_path, html_path
