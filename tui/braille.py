"""Line charts drawn with braille dots (2x4 per cell) as Rich Text.

Drawn ourselves rather than with plotext or Textual's Sparkline: both fail on NaN or
Inf, and plotext's cost grows with the number of points. Input here is already
decimated to two buckets per cell, so a chart costs O(width x height) whatever the run's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.style import Style
from rich.text import Text

from .store import FLAG_NAN, FLAG_NEG_INF, FLAG_POS_INF, Bucket

_DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


@dataclass
class Line:
    buckets: list[Bucket | None]  # one per dot column; None = no data there
    style: str
    markers: bool = True  # draw NaN/Inf markers for this line


@dataclass
class HLine:
    y: float
    style: str


@dataclass
class ChartSpec:
    width: int  # cells
    height: int  # cells
    lines: list[Line]
    hlines: list[HLine] = field(default_factory=list)
    y_range: tuple[float, float] | None = None


def finite_range(lines: list[Line]) -> tuple[float, float] | None:
    lo, hi = math.inf, -math.inf
    for ln in lines:
        for b in ln.buckets:
            if b is not None and b.lo <= b.hi:
                lo = min(lo, b.lo)
                hi = max(hi, b.hi)
    if lo > hi:
        return None
    return lo, hi


def padded(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        d = abs(hi) * 0.05 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * 0.05
    return lo - d, hi + d


def draw(spec: ChartSpec) -> list[Text]:
    w, h = max(1, spec.width), max(1, spec.height)
    rows = h * 4
    dots = [[0] * w for _ in range(h)]
    colour: list[list[str | None]] = [[None] * w for _ in range(h)]
    marks: dict[tuple[int, int], tuple[str, str]] = {}
    yr = spec.y_range or finite_range(spec.lines)
    if yr is None:
        yr = (0.0, 1.0)
    lo, hi = yr
    span = (hi - lo) or 1.0

    def ypix(v: float) -> int:
        p = int(round((hi - v) / span * (rows - 1)))
        return min(rows - 1, max(0, p))

    for ln in spec.lines:
        prev: int | None = None
        for x, b in enumerate(ln.buckets[: w * 2]):
            cx, sub = divmod(x, 2)
            if b is None:
                prev = None
                continue
            if ln.markers and b.flags:
                if b.flags & FLAG_NAN:
                    marks[(0, cx)] = ("N", "bold white on red")
                if b.flags & FLAG_POS_INF:
                    marks[(0, cx)] = ("▲", "bold red")
                if b.flags & FLAG_NEG_INF:
                    marks[(h - 1, cx)] = ("▼", "bold red")
            if b.lo > b.hi:  # nothing finite here
                prev = None
                continue
            top, bot = ypix(b.hi), ypix(b.lo)
            last = ypix(b.last) if math.isfinite(b.last) else top
            if prev is not None:  # join to the previous column
                top, bot = min(top, prev), max(bot, prev)
            for y in range(top, bot + 1):
                cy, r = divmod(y, 4)
                dots[cy][cx] |= _DOT[sub][r]
                colour[cy][cx] = ln.style
            prev = last
    hrows: dict[int, str] = {}
    for hl in spec.hlines:
        if lo <= hl.y <= hi:
            hrows[ypix(hl.y) // 4] = hl.style
    out = []
    for cy in range(h):
        # one span per run of equally styled cells: per-cell spans make Textual's compositing slow
        t = Text(no_wrap=True, overflow="crop")
        run_chars: list[str] = []
        run_style: str | None = None
        row_dots, row_colour, hstyle = dots[cy], colour[cy], hrows.get(cy)
        for cx in range(w):
            m = marks.get((cy, cx)) if marks else None
            if m:
                ch, st = m
            elif row_dots[cx]:
                ch, st = chr(0x2800 + row_dots[cx]), row_colour[cx]
            elif hstyle:
                ch, st = "╌", hstyle
            else:
                ch, st = " ", None
            if st != run_style and run_chars:
                t.append("".join(run_chars), run_style)
                run_chars = []
            run_style = st
            run_chars.append(ch)
        if run_chars:
            t.append("".join(run_chars), run_style)
        out.append(t)
    return out


def ema(buckets: list[Bucket | None], weight: float, per_bucket: float) -> list[Bucket | None]:
    """TensorBoard-style debiased EMA of the buckets' last values (weight per step,
    compounded over a bucket's rows). Non-finite values are passed over."""
    out: list[Bucket | None] = []
    w = weight ** max(1.0, per_bucket)
    acc, norm = 0.0, 0.0
    for b in buckets:
        if b is None or not math.isfinite(b.last):
            out.append(None if b is None else Bucket(math.inf, -math.inf, math.nan, 0, b.step))
            continue
        acc = acc * w + (1 - w) * b.last
        norm = norm * w + (1 - w)
        v = acc / norm
        out.append(Bucket(v, v, v, 0, b.step))
    return out


def fmt_value(v: float | None) -> str:
    if v is None:
        return "—"
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def style_for(level: str) -> Style:
    return Style.parse({"ok": "green", "warning": "yellow", "critical": "red", "none": "white"}[level])
