"""The report's figures as small hand-written SVG (inline ``data:`` URLs): line panels, a heat map pair, stacked
bars. No matplotlib and no numpy: a 12-class report draws in milliseconds where matplotlib took seconds (import,
layout, Agg raster, PNG). The same colour scale (:data:`BLUES`, matplotlib's "Blues") feeds the TensorBoard
confusion image (:func:`finetune.reporting.report.confusion_image`), so the two look alike.

Every user string (a class, group or layer name) goes through :func:`text`: control characters escaped visibly,
then XML-escaped; nothing is ever parsed as markup or maths.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Sequence

from finetune.errors import shown

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10
BLUES = ((0.0, (247, 251, 255)), (0.125, (222, 235, 247)), (0.25, (198, 219, 239)), (0.375, (158, 202, 225)),
         (0.5, (107, 174, 214)), (0.625, (66, 146, 198)), (0.75, (33, 113, 181)), (0.875, (8, 81, 156)),
         (1.0, (8, 48, 107)))
FONT = "font-family='DejaVu Sans,Arial,Helvetica,sans-serif'"


def text(value: Any) -> str:
    """User text as SVG character data (and attribute-safe)."""
    return html.escape(shown(value), quote=True)


def blues(v: float) -> tuple[int, int, int]:
    """A value in [0, 1] on the Blues scale (linear between matplotlib's nine stops)."""
    v = min(max(v, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(BLUES, BLUES[1:]):
        if v <= b:
            f = (v - a) / (b - a)
            return tuple(round(x + f * (y - x)) for x, y in zip(ca, cb))  # type: ignore[return-value]
    return BLUES[-1][1]


def hexrgb(c: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % c


def uri(svg: str) -> str:
    """An SVG document as an inline ``data:`` URL (an <img> shows it; no script runs in it)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def doc(w: float, h: float, body: list[str]) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{w:.0f}' height='{h:.0f}' viewBox='0 0 {w:.0f} "
            f"{h:.0f}' {FONT} font-size='11'><rect width='100%' height='100%' fill='white'/>" + "".join(body)
            + "</svg>")


def num(v: float) -> str:
    """A tick label: short, with an exponent for tiny or huge magnitudes."""
    if v == 0:
        return "0"
    a = abs(v)
    if 1 <= a < 1e5 and float(v).is_integer():
        return str(int(v))
    if a < 1e-2 or a >= 1e5:
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    return f"{v:.4g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi - lo <= 0:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n, 1)
    p = 10 ** math.floor(math.log10(raw))
    step = next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


class Panel:
    """One line chart: ``series`` are (label, [(x, y), ...]); ``log``: a log10 y axis; ``vlines``: x positions
    drawn dashed red (with a label on panels that ask for it)."""

    def __init__(self, title: str, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *,
                 log: bool = False, vlines: Sequence[tuple[float, str]] = (), vlabels: bool = False,
                 xlabel: str = "epoch"):
        self.title, self.log, self.vlines, self.vlabels, self.xlabel = title, log, list(vlines), vlabels, xlabel
        self.series = [(lab, [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(y)
                              and (not log or y > 0)]) for lab, pts in series]
        self.series = [(lab, pts) for lab, pts in self.series if pts]

    def draw(self, x0: float, y0: float, w: float, h: float, xr: tuple[float, float]) -> list[str]:
        L, R, T, B = 58, 104, 22, 34  # margins: tick labels left, legend right, title above, x label below
        pw, ph = w - L - R, h - T - B
        out = [f"<text x='{x0 + L + pw / 2:.1f}' y='{y0 + 14:.1f}' text-anchor='middle' font-size='12'>"
               f"{text(self.title)}</text>"]
        ys = [y for _, pts in self.series for _, y in pts]
        f = (lambda v: math.log10(v)) if self.log else (lambda v: v)
        if ys:
            lo, hi = min(map(f, ys)), max(map(f, ys))
        else:
            lo, hi = 0.0, 1.0
        if self.log:
            lo, hi = math.floor(lo), math.ceil(hi)
            if hi == lo:
                hi += 1
            yt = [float(e) for e in range(int(lo), int(hi) + 1)]
            step = max(1, math.ceil(len(yt) / 6))
            yt = yt[::step]
        else:
            yt = nice_ticks(lo, hi)
            lo, hi = yt[0], yt[-1]
        sx = lambda v: x0 + L + (v - xr[0]) / ((xr[1] - xr[0]) or 1) * pw
        sy = lambda v: y0 + T + ph - (v - lo) / ((hi - lo) or 1) * ph
        out.append(f"<rect x='{x0 + L}' y='{y0 + T}' width='{pw:.1f}' height='{ph:.1f}' fill='none' "
                   "stroke='#888'/>")
        for t in yt:
            yy = sy(t)
            out.append(f"<line x1='{x0 + L}' x2='{x0 + L + pw:.1f}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#e5e5e5'/>"
                       f"<text x='{x0 + L - 4}' y='{yy + 4:.1f}' text-anchor='end'>"
                       f"{num(10 ** t) if self.log else num(t)}</text>")
        xt = [v for v in nice_ticks(xr[0] + 0.7, xr[1] - 0.7, 6) if xr[0] <= v <= xr[1] and float(v).is_integer()]
        for t in xt:
            xx = sx(t)
            out.append(f"<line x1='{xx:.1f}' x2='{xx:.1f}' y1='{y0 + T}' y2='{y0 + T + ph:.1f}' stroke='#eee'/>"
                       f"<text x='{xx:.1f}' y='{y0 + T + ph + 14:.1f}' text-anchor='middle'>{num(t)}</text>")
        out.append(f"<text x='{x0 + L + pw / 2:.1f}' y='{y0 + h - 4:.1f}' text-anchor='middle'>"
                   f"{text(self.xlabel)}</text>")
        for xv, lab in self.vlines:
            xx = sx(xv)
            out.append(f"<line x1='{xx:.1f}' x2='{xx:.1f}' y1='{y0 + T}' y2='{y0 + T + ph:.1f}' stroke='#d62728' "
                       "stroke-dasharray='5,3'/>")
            if self.vlabels and lab:
                out.append(f"<text transform='translate({xx - 3:.1f},{y0 + T + 4}) rotate(-90)' text-anchor='end' "
                           f"font-size='9' fill='#d62728'>{text(lab)}</text>")
        for i, (_, pts) in enumerate(self.series):
            c = COLOURS[i % len(COLOURS)]
            xy = [(sx(x), sy(f(y))) for x, y in pts]
            if len(xy) > 1:
                out.append(f"<polyline fill='none' stroke='{c}' stroke-width='1.6' points='"
                           + " ".join(f"{a:.1f},{b:.1f}" for a, b in xy) + "'/>")
            out.extend(f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2.5' fill='{c}'/>" for a, b in xy)
        if len(self.series) > 1 or (self.series and self.series[0][0] not in ("", None)):
            ly = y0 + T + 12
            for i, (lab, _) in enumerate(self.series):
                c = COLOURS[i % len(COLOURS)]
                out.append(f"<rect x='{x0 + L + pw + 6}' y='{ly - 8 + 13 * i:.1f}' width='10' height='3' "
                           f"fill='{c}'/><text x='{x0 + L + pw + 20}' y='{ly - 3 + 13 * i:.1f}' font-size='10'>"
                           f"{text(str(lab)[:15])}</text>")
        return out


def panels(grid: list[Panel], xr: tuple[float, float], cols: int = 2, w: float = 520, h: float = 260) -> str:
    """Panels in a grid of ``cols`` columns sharing the x range ``xr``; one SVG document."""
    rows = math.ceil(len(grid) / cols)
    body: list[str] = []
    for i, p in enumerate(grid):
        body += p.draw((i % cols) * w, (i // cols) * h, w, h, xr)
    return doc(cols * w, rows * h, body)


def heatmaps(mats: Sequence[tuple[str, list[list[float]], str]], names: list[str]) -> str:
    """Heat maps side by side, each (title, matrix, format): rows true, columns predicted, the Blues scale from 0 to
    the matrix's largest value; the value in each non-zero cell when there are at most 20 classes; a colour bar
    (0 .. max) under each."""
    n = len(names)
    cell = max(6.0, min(32.0, 400.0 / max(n, 1)))
    lab = [text(str(x)[:14]) for x in names] if n <= 40 else [""] * n
    L = 96 if n <= 40 else 20  # room for the row labels
    T, B = 26, (96 if n <= 40 else 20) + 34
    side = cell * n
    pw = L + side + 24
    body: list[str] = []
    fs = max(6.0, min(10.0, cell * 0.38))
    for k, (title, m, fmt) in enumerate(mats):
        ox = k * pw
        hi = max((max(r) for r in m), default=0) or 1
        body.append(f"<text x='{ox + L + side / 2:.1f}' y='16' text-anchor='middle' font-size='12'>"
                    f"{text(title)}</text>")
        for t in range(n):
            for p in range(n):
                v = m[t][p]
                body.append(f"<rect x='{ox + L + p * cell:.1f}' y='{T + t * cell:.1f}' width='{cell + 0.3:.1f}' "
                            f"height='{cell + 0.3:.1f}' fill='{hexrgb(blues(v / hi))}'/>")
                if n <= 20 and v:
                    body.append(f"<text x='{ox + L + (p + 0.5) * cell:.1f}' y='{T + (t + 0.5) * cell + fs / 3:.1f}' "
                                f"text-anchor='middle' font-size='{fs:.1f}' fill='"
                                f"{'white' if v > hi / 2 else 'black'}'>{fmt.format(v)}</text>")
        body.append(f"<rect x='{ox + L}' y='{T}' width='{side:.1f}' height='{side:.1f}' fill='none' stroke='#888'/>")
        for i in range(n):
            if lab[i]:
                body.append(f"<text x='{ox + L - 4}' y='{T + (i + 0.5) * cell + 3.5:.1f}' text-anchor='end' "
                            f"font-size='9'>{lab[i]}</text>")
                body.append(f"<text transform='translate({ox + L + (i + 0.5) * cell + 3:.1f},{T + side + 4:.1f}) "
                            f"rotate(-90)' text-anchor='end' font-size='9'>{lab[i]}</text>")
        body.append(f"<text transform='translate({ox + 10},{T + side / 2:.1f}) rotate(-90)' text-anchor='middle'>"
                    "true</text>")
        by = T + side + B - 26
        body.append(f"<text x='{ox + L + side / 2:.1f}' y='{by - 6:.1f}' text-anchor='middle'>predicted</text>")
        stops = "".join(f"<stop offset='{a}' stop-color='{hexrgb(c)}'/>" for a, c in BLUES)
        body.append(f"<defs><linearGradient id='g{k}'>{stops}</linearGradient></defs>"
                    f"<rect x='{ox + L}' y='{by:.1f}' width='{side:.1f}' height='8' fill='url(#g{k})' stroke='#888'/>"
                    f"<text x='{ox + L}' y='{by + 19:.1f}' font-size='9'>0</text><text x='{ox + L + side:.1f}' "
                    f"y='{by + 19:.1f}' text-anchor='end' font-size='9'>{fmt.format(hi)}</text>")
    return doc(len(mats) * pw, T + side + B, body)


def stacked_bars(labels: list[str], parts: list[tuple[str, str, list[float]]], title: str, xlabel: str) -> str:
    """Horizontal stacked bars, one per label (top to bottom in order), each part (name, colour, values); a
    symmetric-log x axis (linear below 1000) so a 1,000-parameter head shows beside a 4-million-parameter body."""
    n = len(labels)
    L, R, T, B, bh = 120, 20, 26, 44, 18
    w = 720
    pw = w - L - R
    tot = [sum(v[i] for _, _, v in parts) for i in range(n)]
    top = max(tot, default=1) or 1
    f = lambda v: v / 1000 if v <= 1000 else 1 + math.log10(v / 1000)
    scale = pw / f(top * 1.05 if top > 1000 else 1000)
    h = T + n * (bh + 6) + B
    body = [f"<text x='{L}' y='16' font-size='12'>{text(title)}</text>"]
    for i, name in enumerate(labels):
        y = T + i * (bh + 6)
        body.append(f"<text x='{L - 4}' y='{y + bh / 2 + 4}' text-anchor='end'>{text(str(name)[:18])}</text>")
        left = 0.0
        for _, colour, vals in parts:
            v = vals[i]
            if v:
                x1, x2 = f(left) * scale, f(left + v) * scale
                body.append(f"<rect x='{L + x1:.1f}' y='{y}' width='{max(x2 - x1, 0.8):.1f}' height='{bh}' "
                            f"fill='{colour}'/>")
                left += v
    ay = T + n * (bh + 6)
    body.append(f"<line x1='{L}' x2='{L + pw}' y1='{ay}' y2='{ay}' stroke='#888'/>")
    t = 0
    while t == 0 or 10 ** (t - 1) * 1000 <= top * 1.05:
        v = 0 if t == 0 else 1000 * 10 ** (t - 1)
        xx = L + f(v) * scale
        body.append(f"<line x1='{xx:.1f}' x2='{xx:.1f}' y1='{ay}' y2='{ay + 4}' stroke='#888'/><text x='{xx:.1f}' "
                    f"y='{ay + 15}' text-anchor='middle' font-size='10'>{num(v)}</text>")
        t += 1
    body.append(f"<text x='{L + pw / 2}' y='{h - 6}' text-anchor='middle'>{text(xlabel)}</text>")
    lx = L + pw - 240
    for j, (name, colour, _) in enumerate(p for p in parts if any(p[2])):
        body.append(f"<rect x='{lx + 80 * j}' y='7' width='10' height='10' fill='{colour}'/><text "
                    f"x='{lx + 80 * j + 13}' y='16' font-size='10'>{text(name)}</text>")
    return doc(w, h, body)
