"""Line plots drawn with PIL (no plotting library): axes, "nice" ticks (steps of 1, 2 or 5 times a power of
ten), axis labels, a title and a legend. Non-finite values break a line into segments."""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # legend name -> (xs, ys)


@dataclass(frozen=True)
class PlotStyle:
    width: int = 640
    height: int = 400
    font_size: int = 13
    margin_left: int = 70
    margin_right: int = 20
    margin_top: int = 34
    margin_bottom: int = 50
    tick_len: int = 5
    line_width: int = 2


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)  # scalable font when Pillow has FreeType
    except (TypeError, OSError):
        return PIL.ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Tick values in [lo, hi] at a step of 1, 2 or 5 x 10^k giving about `target` ticks."""
    raw = (hi - lo) / max(target, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round((first + i) * step, 12) for i in range(int(math.floor(hi / step + 1e-9)) - first + 1)]


def _tick_label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or step < 1e-4:
        return f"{v:.3g}"
    return f"{v:.{max(0, -math.floor(math.log10(step)))}f}"


def _range(values: list[float]) -> tuple[float, float]:
    """Data range with 5% padding; a single value gets a unit-wide range around it."""
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _axes(finite: list[tuple[float, float]], s: PlotStyle):
    """The plot area's mapping of data to pixels, the lower data corner and the ticks of both axes."""
    x0, y0, x1, y1 = s.margin_left, s.margin_top, s.width - s.margin_right, s.height - s.margin_bottom
    (xlo, xhi), (ylo, yhi) = _range([p[0] for p in finite]), _range([p[1] for p in finite])

    def to_px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    return to_px, (xlo, ylo), (nice_ticks(xlo, xhi), nice_ticks(ylo, yhi))


def _segments(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """The runs of finite points (a non-finite value breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isfinite(x) and math.isfinite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def line_plot(series: Series, title: str = "", xlabel: str = "", ylabel: str = "",
              style: PlotStyle = PlotStyle(), supersample: int = 2) -> PIL.Image.Image:
    """A white RGB image with one line per entry of `series` (colours in order of the mapping), drawn at
    `supersample` times the size and scaled down (anti-aliasing)."""
    big = PlotStyle(**{f.name: getattr(style, f.name) * supersample for f in dataclasses.fields(style)})
    img = _draw(series, title, xlabel, ylabel, big)
    return img.resize((style.width, style.height), PIL.Image.Resampling.LANCZOS)


def _draw(series: Series, title: str, xlabel: str, ylabel: str, s: PlotStyle) -> PIL.Image.Image:
    img = PIL.Image.new("RGB", (s.width, s.height), "white")
    draw = PIL.ImageDraw.Draw(img)
    font = _font(s.font_size)
    x0, y0, x1, y1 = s.margin_left, s.margin_top, s.width - s.margin_right, s.height - s.margin_bottom
    draw.rectangle([x0, y0, x1, y1], outline="black")
    if title:
        draw.text(((x0 + x1) / 2, s.margin_top / 2), title, fill="black", font=font, anchor="mm")
    if xlabel:
        draw.text(((x0 + x1) / 2, s.height - 6), xlabel, fill="black", font=font, anchor="md")
    if ylabel:
        w = int(draw.textlength(ylabel, font=font)) + 4
        label = PIL.Image.new("RGB", (w, s.font_size + 6), "white")
        PIL.ImageDraw.Draw(label).text((2, 1), ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (2, int((y0 + y1) / 2 - label.height / 2)))

    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys)] for name, (xs, ys) in series.items()}
    finite = [p for pts in points.values() for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not finite:
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), "no data", fill="gray", font=font, anchor="mm")
        return img
    to_px, (xlo, ylo), (xt, yt) = _axes(finite, s)
    for v in xt:
        px = to_px(v, ylo)[0]
        draw.line([px, y0, px, y1], fill="#e6e6e6")
        draw.line([px, y1, px, y1 + s.tick_len], fill="black")
        draw.text((px, y1 + s.tick_len + 2), _tick_label(v, xt[1] - xt[0] if len(xt) > 1 else 1.0),
                  fill="black", font=font, anchor="ma")
    for v in yt:
        py = to_px(xlo, v)[1]
        draw.line([x0, py, x1, py], fill="#e6e6e6")
        draw.line([x0 - s.tick_len, py, x0, py], fill="black")
        draw.text((x0 - s.tick_len - 3, py), _tick_label(v, yt[1] - yt[0] if len(yt) > 1 else 1.0),
                  fill="black", font=font, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline="black")

    for k, pts in enumerate(points.values()):
        color = COLORS[k % len(COLORS)]
        for run in _segments(pts):
            segment = [to_px(x, y) for x, y in run]
            if len(segment) > 1:
                draw.line(segment, fill=color, width=s.line_width, joint="curve")
            else:
                (px, py), r = segment[0], s.line_width + 1
                draw.ellipse([px - r, py - r, px + r, py + r], fill=color)

    # legend, top right inside the axes; spacing in units of the font size
    names = list(points)
    if names:
        pad, row, sample = s.font_size // 2, int(s.font_size * 1.4), int(s.font_size * 1.5)
        width = max(int(draw.textlength(n, font=font)) for n in names) + sample + 3 * pad
        lx, ly = x1 - width - pad, y0 + pad
        draw.rectangle([lx, ly, x1 - pad, ly + pad + row * len(names)], fill="white", outline="#999999")
        for k, name in enumerate(names):
            cy = ly + pad + row * k + row // 2
            draw.line([lx + pad, cy, lx + pad + sample, cy], fill=COLORS[k % len(COLORS)],
                      width=s.line_width + 1)
            draw.text((lx + 2 * pad + sample, cy), name, fill="black", font=font, anchor="lm")
    return img


def svg_line_plot(series: Series, title: str = "", xlabel: str = "", ylabel: str = "",
                  style: PlotStyle = PlotStyle(height=320)) -> str:
    """The same plot as `line_plot` as an inline SVG element (text, no image): per line one <polyline> for
    each run of finite points, a dot at every point, so a curve of a few measurements stays readable."""
    e, s = html.escape, style
    x0, y0, x1, y1 = s.margin_left, s.margin_top, s.width - s.margin_right, s.height - s.margin_bottom
    fs = s.font_size
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{s.width}' height='{s.height}' "
           f"viewBox='0 0 {s.width} {s.height}' font-family='sans-serif' font-size='{fs}'>",
           f"<rect width='{s.width}' height='{s.height}' fill='white'/>"]
    if title:
        out.append(f"<text x='{(x0 + x1) / 2:g}' y='{s.margin_top / 2 + fs / 3:g}' text-anchor='middle'>"
                   f"{e(title)}</text>")
    if xlabel:
        out.append(f"<text x='{(x0 + x1) / 2:g}' y='{s.height - 6}' text-anchor='middle'>{e(xlabel)}</text>")
    if ylabel:
        cy = (y0 + y1) / 2
        out.append(f"<text x='{fs}' y='{cy:g}' text-anchor='middle' transform='rotate(-90 {fs} {cy:g})'>"
                   f"{e(ylabel)}</text>")
    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys)] for name, (xs, ys) in series.items()}
    finite = [p for pts in points.values() for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not finite:
        out.append(f"<text x='{(x0 + x1) / 2:g}' y='{(y0 + y1) / 2:g}' text-anchor='middle' fill='gray'>"
                   "no data</text>")
    else:
        to_px, (xlo, ylo), (xt, yt) = _axes(finite, s)
        for v in xt:
            px = to_px(v, ylo)[0]
            out.append(f"<line x1='{px:.1f}' y1='{y0}' x2='{px:.1f}' y2='{y1 + s.tick_len}' stroke='#e6e6e6'/>"
                       f"<text x='{px:.1f}' y='{y1 + s.tick_len + fs + 2}' text-anchor='middle'>"
                       f"{_tick_label(v, xt[1] - xt[0] if len(xt) > 1 else 1.0)}</text>")
        for v in yt:
            py = to_px(xlo, v)[1]
            out.append(f"<line x1='{x0 - s.tick_len}' y1='{py:.1f}' x2='{x1}' y2='{py:.1f}' stroke='#e6e6e6'/>"
                       f"<text x='{x0 - s.tick_len - 3}' y='{py + fs / 3:.1f}' text-anchor='end'>"
                       f"{_tick_label(v, yt[1] - yt[0] if len(yt) > 1 else 1.0)}</text>")
        for k, (name, pts) in enumerate(points.items()):
            color = COLORS[k % len(COLORS)]
            for run in _segments(pts):
                xy = [to_px(x, y) for x, y in run]
                out.append(f"<polyline class='line' data-name='{e(name)}' fill='none' stroke='{color}' "
                           f"stroke-width='{s.line_width}' points='"
                           + " ".join(f"{px:.1f},{py:.1f}" for px, py in xy) + "'/>")
                out += [f"<circle cx='{px:.1f}' cy='{py:.1f}' r='{s.line_width + 1}' fill='{color}'/>"
                        for px, py in xy]
        for k, name in enumerate(points):
            ly = y0 + fs * (1.4 * k + 1.2)
            out.append(f"<line x1='{x1 - 150}' y1='{ly:.1f}' x2='{x1 - 130}' y2='{ly:.1f}' "
                       f"stroke='{COLORS[k % len(COLORS)]}' stroke-width='{s.line_width + 1}'/>"
                       f"<text x='{x1 - 124}' y='{ly + fs / 3:.1f}'>{e(name)}</text>")
    out.append(f"<rect x='{x0}' y='{y0}' width='{x1 - x0}' height='{y1 - y0}' fill='none' stroke='black'/></svg>")
    return "\n".join(out)
