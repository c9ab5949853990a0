"""Metric tiles (the grid) and the detail chart of the selected metric."""
from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from protocol.catalogue import METRICS

from ..braille import ChartSpec, HLine, Line, draw, ema, finite_range, fmt_value, padded
from ..health import level_for, threshold_values
from ..store import COMPANIONS, Bucket, RunStore

LEVEL_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red", "none": "grey50"}
SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "red"}
ZOOM_STEPS = (None, 10_000, 1000, 200)  # whole run, then the last N steps


@dataclass
class ChartView:
    """What every chart shows: shared, changed by keys."""

    zoom: int | None = None  # last N rows, None = whole run
    around_step: int | None = None  # set when jumping to an alert: the window centres here
    smooth: bool = False
    time_axis: bool = False
    alert_marks: list[tuple[int, str]] = field(default_factory=list)  # (step, severity)

    def rows(self, store: RunStore) -> tuple[int, int]:
        if self.around_step is not None:
            return store.index_range(self.zoom or 200, self.around_step)
        return store.index_range(self.zoom)

    def describe(self) -> str:
        z = "whole run" if self.zoom is None else f"last {self.zoom:,}"
        if self.around_step is not None:
            z = f"{self.zoom or 200:,} around step {self.around_step:,}"
        return f"{z} · {'EMA' if self.smooth else 'raw'} · x={'time' if self.time_axis else 'step'}"


def buckets_for(store: RunStore, key: str, a: int, b: int, n: int, time_axis: bool) -> list[Bucket | None]:
    """Rows [a, b) of `key` as n buckets, by row (step axis) or by wall time (gaps stay gaps)."""
    if not time_axis or b - a < 2:
        return store.decimate(key, a, b, n)
    t0, t1 = store.times[a], store.times[b - 1]
    if not (t1 > t0):
        return store.decimate(key, a, b, n)
    col = store.columns[key]
    out: list[Bucket | None] = []
    times = store.times
    s = a
    for k in range(n):
        e = bisect_left(times, t0 + (t1 - t0) * (k + 1) / n, s, b) if k < n - 1 else b
        if e <= s:
            out.append(None)
            continue
        lo, hi, fl = col.range_summary(s, e)
        out.append(Bucket(lo, hi, col.values[e - 1], fl, store.steps[e - 1]))
        s = e
    return out


def chart_lines(store: RunStore, key: str, view: ChartView, width: int, height: int,
                thresholds: bool, rules=None) -> list[Text]:
    a, b = view.rows(store)
    lines: list[Line] = []
    comp = COMPANIONS.get(key)
    if comp and store.columns[comp].present:
        lines.append(Line(buckets_for(store, comp, a, b, width * 2, view.time_axis), "grey62", markers=False))
    main = buckets_for(store, key, a, b, width * 2, view.time_axis)
    if view.smooth:
        lines.append(Line(main, "grey42", markers=True))
        per = (b - a) / max(1, width * 2)
        lines.append(Line(ema(main, 0.9, per), "bright_cyan", markers=False))
    else:
        lines.append(Line(main, "bright_cyan"))
    hl: list[HLine] = []
    yr = finite_range(lines)
    if thresholds and yr:
        lo, hi = yr
        span = (hi - lo) or abs(hi) or 1.0
        for y, sev in threshold_values(key):
            hl.append(HLine(y, SEVERITY_STYLE.get(sev, "yellow")))
            if lo - span <= y <= hi + span:  # near enough to be worth the squashing
                lo, hi = min(lo, y), max(hi, y)
        yr = (lo, hi)
    yr = padded(*yr) if yr else None
    return draw(ChartSpec(width, height, lines, hl, yr)), yr, main


class MetricTile(Widget, can_focus=False):
    """One metric's live chart with its current value, coloured against its thresholds."""

    selected: reactive[bool] = reactive(False)

    def __init__(self, metric: str, **kw):
        super().__init__(**kw)
        self.metric = metric
        self.border_title = metric

    def watch_selected(self, selected: bool) -> None:
        self.set_class(selected, "-selected")

    def render(self) -> Text:
        app = self.app
        store: RunStore = app.store
        w, h = self.content_size.width, self.content_size.height
        value = store.value(self.metric)
        level = level_for(self.metric, value, app.open_alerts)
        head = Text(no_wrap=True, overflow="ellipsis")
        head.append(fmt_value(value), LEVEL_STYLE[level])
        unit = METRICS[self.metric].unit if self.metric in METRICS else ""
        if unit and unit not in ("fraction",):
            head.append(f" {unit}", "grey50")
        comp = COMPANIONS.get(self.metric)
        if comp and store.columns[comp].present:
            head.append(f"  {comp.replace('_mean', '')} {fmt_value(store.value(comp))}", "grey62")
        if value is not None and not math.isfinite(value):
            head.append("  ⚠", "bold red")
        self.styles.border_subtitle_color = None
        if not len(store) or h < 2:
            return Text.assemble(head, "\n", Text("waiting for records…", "grey50"))
        body, _yr, _main = chart_lines(store, self.metric, app.view, w, h - 1, thresholds=False)
        return Text("\n").join([head, *body])


class DetailChart(Widget, can_focus=False):
    """The selected metric, larger: thresholds, alert markers, EMA, step or time axis."""

    metric: reactive[str] = reactive("kl")

    def render(self) -> Text:
        app = self.app
        store: RunStore = app.store
        view: ChartView = app.view
        w, h = self.content_size.width, self.content_size.height
        self.border_title = f"{self.metric} · {view.describe()}"
        if not len(store) or h < 4 or w < 20:
            return Text("waiting for records…", "grey50")
        label_w = 10
        cw = w - label_w - 1
        body, yr, main = chart_lines(store, self.metric, view, cw, h - 2, thresholds=True)
        lo, hi = yr if yr else (0.0, 1.0)
        out: list[Text] = []
        for i, line in enumerate(body):
            if i == 0:
                lab = fmt_value(hi)
            elif i == len(body) - 1:
                lab = fmt_value(lo)
            elif i == len(body) // 2:
                lab = fmt_value((hi + lo) / 2)
            else:
                lab = ""
            out.append(Text.assemble((lab.rjust(label_w)[:label_w], "grey62"), " ", line))
        out.append(Text.assemble(" " * (label_w + 1), self._alert_axis(main, cw)))
        out.append(Text.assemble(" " * (label_w + 1), self._x_axis(store, view, cw)))
        return Text("\n").join(out)

    def _alert_axis(self, main: list[Bucket | None], cw: int) -> Text:
        """A row under the chart with a mark where an alert fired."""
        t = Text(no_wrap=True, overflow="crop")
        cells = [" "] * cw
        styles: list[str | None] = [None] * cw
        steps = [b.step if b is not None else None for b in main]
        for step, sev in self.app.view.alert_marks:
            # the first dot column whose last step reaches the alert's step
            for x, s in enumerate(steps):
                if s is not None and s >= step:
                    if x // 2 < cw:
                        cells[x // 2] = "▲"
                        styles[x // 2] = SEVERITY_STYLE.get(sev, "yellow")
                    break
        for c, s in zip(cells, styles):
            t.append(c, s)
        return t

    def _x_axis(self, store: RunStore, view: ChartView, cw: int) -> Text:
        a, b = view.rows(store)
        if b <= a:
            return Text("")
        if view.time_axis:
            t0 = store.times[0] if len(store) else 0.0
            left = _fmt_duration(store.times[a] - t0)
            right = _fmt_duration(store.times[b - 1] - t0)
        else:
            left, right = f"step {store.steps[a]:,}", f"step {store.steps[b - 1]:,}"
        pad = max(1, cw - len(left) - len(right))
        return Text(left + " " * pad + right, "grey62", no_wrap=True, overflow="crop")


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(max(0, s))
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
