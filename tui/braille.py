"""Line charts drawn with braille dots (2x4 per cell) as Rich Text.

Drawn ourselves rather than with plotext or Textual's Sparkline: both fail on NaN or
Inf, and plotext's cost grows with the number of points. Input here is already
decimated to two buckets per cell, so a chart costs O(width x height) whatever the run's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.text import Text

from .store import FLAG_NAN, FLAG_NEG_INF, FLAG_POS_INF, Bucket

_DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


@dataclass
class Line:
    buckets: list[Bucket | None]  # one per dot column; None = no data there
    style: str
    markers: bool = True  # draw NaN/Inf markers for this line
    band: str | None = None  # a bucket's min..max drawn in this style, its last value as the line


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
    ascii: bool = False  # one ASCII character per cell instead of braille dots
    cursor: int | None = None  # a cell column drawn as the value cursor


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
    """The chart as one Rich Text per row."""
    out = []
    for row in draw_runs(spec):
        t = Text(no_wrap=True, overflow="crop")
        for chars, style in row:
            t.append(chars, style)
        out.append(t)
    return out


Runs = list[tuple[str, "str | None"]]


def draw_runs(spec: ChartSpec) -> list[Runs]:
    """The chart as rows of (characters, style) runs: widgets turn them into Strips directly,
    without a round trip through Rich Text and Textual's wrapping."""
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

    scale = (rows - 1) / span
    top_row = rows - 1

    def ypix(v: float) -> int:
        p = int(round((hi - v) * scale))
        return top_row if p > top_row else 0 if p < 0 else p

    for ln in spec.lines:
        prev: int | None = None
        style = ln.style
        for x, b in enumerate(ln.buckets[: w * 2]):
            cx, sub = x >> 1, x & 1
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
            top = int(round((hi - b.hi) * scale))
            top = top_row if top > top_row else 0 if top < 0 else top
            bot = int(round((hi - b.lo) * scale))
            bot = top_row if bot > top_row else 0 if bot < 0 else bot
            last = ypix(b.last) if b.last == b.last and b.last not in (math.inf, -math.inf) else top
            if ln.band is not None and bot > top + 1:
                # a column of many records: its min and max as dim dots (the band's edges), and
                # the line through the middle of the range; a noisy whole-run view is then an
                # envelope around a line, not a solid block
                for r in (top, bot):
                    cy = r >> 2
                    dots[cy][cx] |= _SPAN[sub][r & 3][r & 3]
                    if colour[cy][cx] is None:
                        colour[cy][cx] = ln.band
                top = bot = last = (top + bot) >> 1
            if prev is not None:  # join to the previous column
                if prev < top:
                    top = prev
                elif prev > bot:
                    bot = prev
            # whole braille cells at once: the dots of rows r0..r1 of one cell come from a table
            for cy in range(top >> 2, (bot >> 2) + 1):
                r0 = top - (cy << 2) if top > cy << 2 else 0
                r1 = bot - (cy << 2) if bot < (cy << 2) + 3 else 3
                dots[cy][cx] |= _SPAN[sub][r0][r1]
                colour[cy][cx] = style
            prev = last
    hrows: dict[int, str] = {}
    for hl in spec.hlines:
        if lo <= hl.y <= hi:
            hrows[ypix(hl.y) // 4] = hl.style
    out = []
    for cy in range(h):
        # one span per run of equally styled cells: per-cell spans make Textual's compositing slow
        row_dots, row_colour, hstyle = dots[cy], colour[cy], hrows.get(cy)
        glyphs = _ASCII if spec.ascii else _BRAILLE
        blank = ("-" if spec.ascii else "╌", hstyle) if hstyle else (" ", None)
        cells = [(glyphs[d], c) if d else blank for d, c in zip(row_dots, row_colour)]
        if marks:
            for (my, mx), m in marks.items():
                if my == cy:
                    cells[mx] = (_ASCII_MARK.get(m[0], m[0]), m[1]) if spec.ascii else m
        if spec.cursor is not None and 0 <= spec.cursor < w:
            ch, st = cells[spec.cursor]
            cells[spec.cursor] = ("|" if spec.ascii else "│", "reverse") if ch == " " else (ch, "reverse")
        row: Runs = []
        run_chars: list[str] = []
        run_style: str | None = None
        for ch, st in cells:
            if st != run_style and run_chars:
                row.append(("".join(run_chars), run_style))
                run_chars = []
            run_style = st
            run_chars.append(ch)
        if run_chars:
            row.append(("".join(run_chars), run_style))
        out.append(row)
    return out


_BRAILLE = [chr(0x2800 + i) for i in range(256)]


def _ascii_of(d: int) -> str:
    """A braille cell's dots as one ASCII character, by which of its 4 rows hold dots."""
    rows = [r for r in range(4) if d & (_DOT[0][r] | _DOT[1][r])]
    if not rows:
        return " "
    if rows[-1] - rows[0] >= 2:
        return "|"
    return {0: "'", 1: "-", 2: "-", 3: "."}[rows[0]] if rows[0] == rows[-1] else {0: "'", 1: "-", 2: "."}[rows[0]]


_ASCII = [_ascii_of(i) for i in range(256)]
_ASCII_MARK = {"▲": "^", "▼": "v", "N": "N"}
# _SPAN[sub][r0][r1]: the dots of rows r0..r1 (0..3) in dot column sub of a cell
_SPAN = [[[sum(_DOT[sub][r] for r in range(r0, r1 + 1)) for r1 in range(4)] for r0 in range(4)] for sub in range(2)]


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
