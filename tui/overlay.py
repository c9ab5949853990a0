"""Comparing runs: several runs overlaid in every chart (`rlhf-tui RUN_A RUN_B ...`).

The first run is the one the monitor is about (its banner, checks, samples, box); the others
are drawn over it, each in a colour of its own that it keeps while it is compared. Runs are
aligned on a common x axis: the step, the time since each run's first record, or the tokens
it has trained on so far. Each run's column is cut into the chart's dot columns by x value
(bisect on a monotone x array), so runs of different lengths and step rates line up.

No Textual here and no file IO: the app owns the followers, this module the maths.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import RunModel
from .store import Bucket, RunStore, is_missing

# Stable per-run colours: none of them is a state colour (green / yellow / red) of a tile
RUN_COLOURS = ("bright_cyan", "magenta", "dark_orange", "bright_blue", "orchid1", "bright_white")
RUN_LABELS = "ABCDEF"
MAX_RUNS = len(RUN_COLOURS)
AXES = ("step", "time", "tokens")


@dataclass
class ComparedRun:
    """One run of a comparison: its letter and colour, its model, and who reads it."""

    label: str
    colour: str
    model: RunModel
    target: str = ""  # what the user named (a path, or the ssh:// URL)
    token: int = 0  # the messages of its follower carry this
    follower: Any = None  # tui.follow.RunFollower
    remote: Any = None  # tui.remote.RemoteSync of an ssh:// run

    @property
    def name(self) -> str:
        return self.model.run_id if self.model.paths is not None else Path(self.target).name or self.target


@dataclass
class Comparison:
    """The runs on screen; runs[0] is the app's own run. Widgets share this object."""

    runs: list[ComparedRun] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return len(self.runs) > 1

    def add(self, model: RunModel, target: str = "") -> ComparedRun | None:
        """A new run with the first free letter (and its colour), or None when all are used."""
        used = {r.label for r in self.runs}
        for label, colour in zip(RUN_LABELS, RUN_COLOURS):
            if label not in used:
                run = ComparedRun(label, colour, model, target)
                self.runs.append(run)
                self.runs.sort(key=lambda r: r.label)
                return run
        return None

    def remove(self, run: ComparedRun) -> None:
        self.runs = [r for r in self.runs if r is not run]

    def by_token(self, token: int) -> ComparedRun | None:
        return next((r for r in self.runs[1:] if r.token == token), None)

    def by_root(self, root) -> ComparedRun | None:
        """The run whose dir is `root` (its model's, or before it is read, the path it was given)."""
        key = _resolved(root)
        for r in self.runs:
            where = r.model.paths.root if r.model.paths is not None else r.target
            if where and _resolved(where) == key:
                return r
        return None


def _resolved(path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):
        return str(path)


# -- x values ---------------------------------------------------------------------------------


class _XCache:
    """A run's x values on the time or tokens axis, extended as the run grows (a monotone array:
    time since the first record, NaN carried over; tokens summed, a missing count adds none)."""

    def __init__(self):
        self.key: tuple = ()
        self.xs = array("d")

    def get(self, store: RunStore, axis: str) -> array:
        n = len(store)
        steps = store.steps
        fresh = (
            self.key[:2] == (id(steps), axis)
            and self.key[2] <= n
            and self.key[2] > 0
            and steps[self.key[2] - 1] == self.key[3]
            and steps[0] == self.key[4]
        )
        if not fresh:
            self.xs = array("d")
        xs = self.xs
        k = len(xs)
        if n - k > 10_000:  # a whole history at once: numpy, the same values as the loop below
            self._fill(store, axis, k, n)
        elif axis == "time":
            times = store.times
            t0 = next((t for t in times[: min(n, 1000)] if math.isfinite(t)), 0.0)
            prev = xs[-1] if k else 0.0
            for i in range(k, n):
                t = times[i] - t0
                prev = t if t > prev else prev  # a clock that went back, or NaN: hold
                xs.append(prev)
        else:
            col = store.columns["tokens"].values
            total = xs[-1] if k else 0.0
            for i in range(k, n):
                v = col[i]
                if not is_missing(v) and v > 0 and math.isfinite(v):
                    total += v
                xs.append(total)
        self.key = (id(steps), axis, n, steps[n - 1] if n else None, steps[0] if n else None)
        return self.xs

    def _fill(self, store: RunStore, axis: str, k: int, n: int) -> None:
        import numpy as np

        xs = self.xs
        if axis == "time":
            times = np.frombuffer(store.times, dtype=np.float64)
            head = times[: min(n, 1000)]
            finite = head[np.isfinite(head)]
            t0 = float(finite[0]) if len(finite) else 0.0
            t = times[k:n] - t0
            t = np.where(np.isnan(t), -np.inf, t)  # NaN holds the value before it
            prev = xs[-1] if k else 0.0
            new = np.maximum.accumulate(np.concatenate(([prev], t)))[1:]
        else:
            v = np.frombuffer(store.columns["tokens"].values, dtype=np.float64)[k:n]
            v = np.where(np.isfinite(v) & (v > 0), v, 0.0)  # MISSING is a NaN: adds none
            new = (xs[-1] if k else 0.0) + np.cumsum(v)
        xs.frombytes(new.astype(np.float64).tobytes())


_caches: dict[int, _XCache] = {}


def x_values(store: RunStore, axis: str):
    """The store's x value per row on `axis` (monotone, non-decreasing)."""
    if axis == "step":
        return store.steps
    cache = _caches.get(id(store))
    if cache is None:
        if len(_caches) > 64:  # stores of runs no longer compared
            _caches.clear()
        cache = _caches[id(store)] = _XCache()
    return cache.get(store, axis)


def x_window(
    stores: list[RunStore], axis: str, zoom: int | None, around_step: int | None
) -> tuple[float, float] | None:
    """[x0, x1] shown: every run whole, the last `zoom` steps of the run that went furthest,
    or `zoom` (200 by default) steps around a step of the first run (an alert jumped to)."""
    live = [s for s in stores if len(s)]
    if not live:
        return None
    xs = [x_values(s, axis) for s in live]
    if around_step is not None and axis == "step":  # any run's step (an alert of B, say)
        half = (zoom or 200) // 2
        return float(around_step - half), float(around_step + half)
    if around_step is not None and len(stores[0]):
        s0 = stores[0]
        a, b = s0.index_range(zoom or 200, around_step)
        x = x_values(s0, axis)
        return float(x[a]), float(x[max(a, b - 1)])
    hi = max(float(x[-1]) for x in xs)
    if zoom is None:
        lo = min(float(x[0]) for x in xs)
    elif axis == "step":
        lo = hi - zoom + 1
    else:
        far = max(range(len(xs)), key=lambda i: xs[i][-1])
        lo = float(xs[far][max(0, len(xs[far]) - zoom)])
    return lo, hi


def anchored(lo: float, hi: float, axis: str, zoom: int | None) -> tuple[float, float]:
    """A live window that new records fill at its right edge instead of rescaling it every frame
    (every cell of every chart would be sent again): the whole run's span rounded up to 1, 2 or 5
    x 10^k; the last N steps moving forward by N/4 when full."""
    if zoom is None:
        span = hi - lo
        if not (span > 0) or not math.isfinite(span):
            return lo, hi
        mag = 10 ** math.floor(math.log10(span))
        return lo, lo + next(k * mag for k in (1, 2, 5, 10) if k * mag >= span)
    if axis != "step":
        return lo, hi
    quarter = max(1, zoom // 4)
    start = math.ceil((hi - zoom) / quarter) * quarter
    return start, start + zoom


def overlay_buckets(store: RunStore, key: str, axis: str, x0: float, x1: float, n: int) -> list[Bucket | None]:
    """The run's `key` in n dot columns over [x0, x1]. A column with no record of its own,
    between two that have some, holds the previous value (a run with fewer records than
    columns is one line, not dots); outside the run's own x range, columns are empty."""
    col = store.columns.get(key)
    out: list[Bucket | None] = [None] * n
    if col is None or not col.present or not len(store) or n <= 0:
        return out
    xs = x_values(store, axis)
    vals, steps = col.values, store.steps
    width = (x1 - x0) / n if x1 > x0 else 0.0
    s = bisect_left(xs, x0)
    end = bisect_right(xs, x1)
    held: Bucket | None = None
    if 0 < s < len(xs):  # the window starts inside the run: hold the value before it
        v = vals[s - 1]
        held = Bucket(v, v, v, 0, steps[s - 1]) if math.isfinite(v) else None
    for k in range(n):
        e = bisect_left(xs, x0 + width * (k + 1), s, end) if k < n - 1 and width > 0 else end
        if e > s:
            lo, hi, fl = col.range_summary(s, e)
            out[k] = Bucket(lo, hi, vals[e - 1], fl, steps[e - 1])
            v = vals[e - 1]
            held = Bucket(v, v, v, 0, steps[e - 1]) if math.isfinite(v) else None
            s = e
        elif s < len(xs) and held is not None:
            out[k] = held
        if s >= end:
            break
    return out


def column_of(store: RunStore, axis: str, step: int, x0: float, x1: float, n: int) -> int | None:
    """The dot column where `step` of this run is drawn (None: outside the window)."""
    if not len(store) or not (x1 >= x0):
        return None
    i = bisect_left(store.steps, step)
    if i >= len(store):
        return None
    x = x_values(store, axis)[i]
    if x < x0 or x > x1:
        return None
    return min(n - 1, int((x - x0) / (x1 - x0) * n)) if x1 > x0 else 0


def fmt_x(axis: str, x: float) -> str:
    """An x axis label: 'step 1,200', '12:05' (since each run's first record), '1.2M tok'."""
    if axis == "step":
        return f"step {int(x):,}"
    if axis == "time":
        s = int(max(0.0, x)) if math.isfinite(x) else 0
        h, r = divmod(s, 3600)
        return f"{h}:{r // 60:02d}:{r % 60:02d}" if h else f"{r // 60}:{r % 60:02d}"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf} tok"
    return f"{x:.0f} tok"


OFF_SCALE = 5.0  # a run whose range is this many times the others' span is drawn off the scale


def shared_y(ranges: list[tuple[float, float] | None]) -> tuple[tuple[float, float] | None, int | None]:
    """The y range shared by runs of these (finite) ranges, and which run is off the scale: when
    one run alone spans more than OFF_SCALE times what all the others span (a run that
    diverged), the others' range, so their lines stay readable and its line rides the chart's
    edge past the point where it left them (as TensorBoard's "ignore outliers in chart scaling")."""
    valid = [(i, r) for i, r in enumerate(ranges) if r is not None]
    if not valid:
        return None, None
    lo, hi = min(r[0] for _i, r in valid), max(r[1] for _i, r in valid)
    best: tuple[int, float, tuple[float, float]] | None = None
    for i, (rlo, rhi) in valid if len(valid) > 1 else ():
        rest = [r for j, r in valid if j != i]
        olo, ohi = min(r[0] for r in rest), max(r[1] for r in rest)
        span = (ohi - olo) or abs(ohi) or 1.0
        if rhi - rlo > OFF_SCALE * span and hi - lo > OFF_SCALE * span and (best is None or span < best[1]):
            best = (i, span, (olo, ohi))
    if best is None:
        return (lo, hi), None
    return best[2], best[0]


def _middle(b: Bucket | None) -> Bucket | None:
    """A column of many records as one point, the middle of its range: several runs' min-max
    ranges drawn over each other would fill the chart; a run's own chart keeps them."""
    if b is None or not (b.lo < b.hi):
        return b
    m = (b.lo + b.hi) / 2
    return Bucket(m, m, m, b.flags, b.step)


def overlay_lines(
    runs: list[ComparedRun],
    key: str,
    axis: str,
    zoom: int | None,
    around_step: int | None,
    dots: int,
    ema_weight=None,
    live: bool = False,
):
    """One line per run (in its colour) of `key` over the common window, the window itself, and
    each run's buckets (for the cursor and the alert marks). Each run's EMA when `ema_weight`;
    `live`: the window is anchored (`anchored`)."""
    from .braille import Line, ema  # braille imports the store, as this module does

    stores = [r.model.store for r in runs]
    win = x_window(stores, axis, zoom, around_step)
    lines: list = []
    per_run: list[list[Bucket | None]] = []
    if win is None:
        return lines, None, per_run
    if live and around_step is None:
        win = anchored(*win, axis, zoom)
    x0, x1 = win
    for r, store in zip(runs, stores):
        buckets = overlay_buckets(store, key, axis, x0, x1, dots)
        per_run.append(buckets)
        if ema_weight is not None:
            rows = max(1, len(store))
            per = rows / max(1, dots)
            buckets = ema(buckets, ema_weight, per)
        else:
            buckets = [_middle(b) for b in buckets]
        lines.append(Line(buckets, r.colour, markers=True))
    # the first run on top: drawn last, its colour wins a shared cell
    return lines[::-1], win, per_run
