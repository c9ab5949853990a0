"""Metric tiles (the grid) and the detail chart of the selected metric."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.geometry import Region
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from protocol.alerts import DEFAULT_RULES
from protocol.catalogue import METRICS

from ..braille import ChartSpec, HLine, Line, Runs, draw_runs, ema, finite_range, fmt_value, padded
from ..health import level_for, threshold_values
from ..model import RunModel
from ..store import COMPANIONS, Bucket, RunStore

LEVEL_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red", "none": "grey50"}
SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "red"}
ZOOM_STEPS = (None, 10_000, 1000, 200)  # whole run, then the last N steps


@dataclass
class ChartView:
    """What every chart shows: one object the charts share; the app's reactive view
    settings (keys) write it."""

    zoom: int | None = None  # last N rows, None = whole run
    around_step: int | None = None  # set when jumping to an alert: the window centres here
    smooth: bool = False
    time_axis: bool = False

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
    """Rows [a, b) of `key` as n buckets, by row (step axis) or by wall time (gaps stay gaps).

    Fewer rows than dot columns are stretched over the whole width (each row repeated over
    its share of the columns), so the x axis always spans the chart and its labels are true."""
    if not time_axis or b - a < 2:
        rows = store.decimate(key, a, b, n)
        if 0 < len(rows) < n:
            m = len(rows)
            return [rows[k * m // n] for k in range(n)]
        return rows
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


def chart_lines(
    store: RunStore, key: str, view: ChartView, width: int, height: int, thresholds: bool, rules=None
) -> tuple[list[Runs], tuple[float, float] | None, list]:
    """The chart of `key` as rows of styled runs, its y range, and the main line's buckets."""
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
        for y, sev in threshold_values(key, rules if rules is not None else DEFAULT_RULES):
            hl.append(HLine(y, SEVERITY_STYLE.get(sev, "yellow")))
            if lo - span <= y <= hi + span:  # near enough to be worth the squashing
                lo, hi = min(lo, y), max(hi, y)
        yr = (lo, hi)
    yr = padded(*yr) if yr else None
    return draw_runs(ChartSpec(width, height, lines, hl, yr)), yr, main


def runs_text(rows: list[Runs]) -> Text:
    """Rows of runs as one Rich Text (tests and exports read widgets through this)."""
    t = Text(no_wrap=True, overflow="crop")
    for i, row in enumerate(rows):
        if i:
            t.append("\n")
        for chars, style in row:
            t.append(chars, style)
    return t


class StripWidget(Widget, can_focus=False):
    """A widget drawn with the Line API from cached Strips.

    Rendering through `render()` makes Textual convert Rich Text to its Content, wrap it and
    style every span on each refresh: ~5 ms per chart. Here a chart is drawn once per data
    version into runs of (chars, style), turned into Strips with pre-combined styles, and
    Textual only asks again for lines marked dirty (`refresh(region)`)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._styles: dict[tuple[Style, str | None], Style] = {}

    def _style(self, base: Style, name: str | None) -> Style:
        st = self._styles.get((base, name))
        if st is None:
            if len(self._styles) > 256:
                self._styles.clear()
            st = self._styles[(base, name)] = base + Style.parse(name) if name else base
        return st

    def _strip(self, runs: Runs, width: int, base: Style) -> Strip:
        """Runs hold one-cell characters only (braille, box drawing, ASCII): lengths are cells."""
        segs = [Segment(chars, self._style(base, style)) for chars, style in runs]
        return Strip(segs, sum(len(c) for c, _ in runs)).adjust_cell_length(width, base)

    def _text_strip(self, text: Text, width: int, base: Style) -> Strip:
        segs = [
            Segment(seg.text, base + seg.style if seg.style else base)
            for seg in text.render(self.app.console)
            if seg.text != "\n"
        ]
        return Strip(segs).adjust_cell_length(width, base)


UNIT_SHORT = {"nats/token": "nats", "tokens/s": "tok/s", "tokens": "tok", "score": ""}
COMPANION_LABEL = {"kl_target": ("kl_target", "target", "tgt"), "gold_reward_mean": ("gold_reward", "gold", "gold")}


def value_label(
    metric: str, value: float | None, comp: str | None, comp_value: float | None, level: str, width: int
) -> Text:
    """The value line of a tile, made to fit `width` cells: the unit is shortened, then dropped,
    the companion's name shortened, before anything is cut. The value itself always shows."""
    val = fmt_value(value)
    warn = value is not None and not math.isfinite(value)
    unit = METRICS[metric].unit if metric in METRICS else ""
    unit = "" if unit == "fraction" else unit
    units = [unit, UNIT_SHORT.get(unit, unit), ""] if unit else [""]
    labels = (*COMPANION_LABEL.get(comp, (comp,)), None) if comp else (None,)
    cval = fmt_value(comp_value) if comp else ""
    choice = None
    for lab in labels:
        for u in units:
            n = len(val) + (len(u) + 1 if u else 0) + (len(lab) + 3 + len(cval) if lab else 0) + (3 if warn else 0)
            if n <= width:
                choice = (u, lab)
                break
        if choice:
            break
    u, lab = choice or (units[-1], labels[-1])
    gap = "  "
    head = Text(no_wrap=True, overflow="ellipsis")
    head.append(val, LEVEL_STYLE[level])
    if u:
        head.append(f" {u}", "grey50")
    if lab:
        head.append(f"{gap}{lab} {cval}", "grey62")
    if warn:
        head.append("  ⚠", "bold red")
    head.truncate(width, overflow="ellipsis")
    return head


class MetricTile(StripWidget):
    """One metric's live chart with its current value, coloured against its thresholds.

    Line 0 (the value) and the chart below it are refreshed separately: the value at the
    app's frame rate, the chart at the (lower) chart rate, each only when it changed."""

    selected: reactive[bool] = reactive(False)

    def __init__(self, metric: str, model: RunModel, view: ChartView, **kw):
        super().__init__(**kw)
        self.metric = metric
        self.model, self.view = model, view
        self.border_title = metric
        self.chart_version = 0  # bumped by the app when the chart should be drawn again
        self._head_key = None
        self._head: Strip | None = None
        self._head_base: Style | None = None
        self._body_strips_base: Style | None = None
        self._body_key = None
        self._body: list[Runs] = []
        self._body_strips: list[Strip] = []

    def watch_selected(self, selected: bool) -> None:
        self.set_class(selected, "-selected")

    # -- what is shown ----------------------------------------------------------------

    def _head_state(self, width: int) -> tuple:
        store = self.model.store
        value = store.value(self.metric)
        comp = COMPANIONS.get(self.metric)
        comp = comp if comp and store.columns[comp].present else None
        cval = store.value(comp) if comp else None
        level = level_for(self.metric, value, self.model.open_alerts, self.model.rules)
        # fmt_value strings, not floats: a change below the shown precision draws nothing
        return (fmt_value(value), level, fmt_value(cval) if comp else None, width), (value, comp, cval, level)

    def head_text(self, width: int | None = None) -> Text:
        width = self.content_size.width if width is None else width
        _key, (value, comp, cval, level) = self._head_state(width)
        return value_label(self.metric, value, comp, cval, level, max(1, width))

    def body_runs(self, width: int | None = None, height: int | None = None) -> list[Runs]:
        w = self.content_size.width if width is None else width
        h = (self.content_size.height if height is None else height) - 1
        store = self.model.store
        key = (self.chart_version, w, h, not len(store))
        if key != self._body_key:
            self._body_key = key
            self._body_strips = []
            if not len(store) or h < 1:
                self._body = [[("waiting for records…", "grey50")]]
            else:
                self._body = chart_lines(store, self.metric, self.view, w, h, thresholds=False)[0]
        return self._body

    def render(self) -> Text:
        """The tile as text (what `render_line` draws; for tests and exports)."""
        return Text("\n").join([self.head_text(), runs_text(self.body_runs())])

    # -- refresh --------------------------------------------------------------------------

    def refresh_value(self) -> None:
        """Redraw the value line if what it shows changed."""
        if self._head_state(self.content_size.width)[0] != self._head_key:
            self.refresh(Region(0, 0, self.content_size.width, 1))

    def redraw_chart(self) -> None:
        """Draw the chart again from the data as it is now; repaint only if it looks different."""
        old = self._body
        self.chart_version += 1
        if self.body_runs() != old:
            w, h = self.content_size
            self.refresh(Region(0, 1, w, max(0, h - 1)))

    # -- Line API ------------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        w, h = self.content_size
        base = self.visual_style.rich_style
        if y == 0:
            key, (value, comp, cval, level) = self._head_state(w)
            if key != self._head_key or self._head is None or self._head_base != base:
                self._head_key, self._head_base = key, base
                self._head = self._text_strip(value_label(self.metric, value, comp, cval, level, w), w, base)
            return self._head
        rows = self.body_runs(w, h)
        if not self._body_strips or self._body_strips_base != base:
            self._body_strips_base = base
            self._body_strips = [self._strip(r, w, base) for r in rows]
        i = y - 1
        return self._body_strips[i] if i < len(self._body_strips) else Strip.blank(w, base)


class DetailChart(StripWidget):
    """The selected metric, larger: thresholds, alert markers, EMA, step or time axis."""

    metric: reactive[str] = reactive("kl")

    def __init__(self, model: RunModel, view: ChartView, **kw):
        super().__init__(**kw)
        self.model, self.view = model, view
        self.chart_version = 0
        self._key = None
        self._rows: list[Runs] = []
        self._strips: list[Strip] = []
        self._strips_base = None

    def update_title(self) -> None:
        title = f"{self.metric} · {self.view.describe()}"
        if title != self.border_title:
            self.border_title = title

    def redraw_chart(self) -> None:
        """Draw the chart again from the data as it is now; repaint only if it looks different."""
        old = self._rows
        self.chart_version += 1
        self.update_title()
        if self.rows() != old:
            self.refresh()

    def rows(self, w: int | None = None, h: int | None = None) -> list[Runs]:
        w = self.content_size.width if w is None else w
        h = self.content_size.height if h is None else h
        key = (self.chart_version, self.metric, w, h, not len(self.model.store))
        if key != self._key:
            self._key = key
            self._strips = []
            self._rows = self._compute(w, h)
        return self._rows

    def _compute(self, w: int, h: int) -> list[Runs]:
        store, view = self.model.store, self.view
        if not len(store) or h < 4 or w < 20:
            return [[("waiting for records…", "grey50")]]
        label_w = 10
        cw = w - label_w - 1
        body, yr, main = chart_lines(store, self.metric, view, cw, h - 2, thresholds=True, rules=self.model.rules)
        lo, hi = yr if yr else (0.0, 1.0)
        out: list[Runs] = []
        for i, line in enumerate(body):
            if i == 0:
                lab = fmt_value(hi)
            elif i == len(body) - 1:
                lab = fmt_value(lo)
            elif i == len(body) // 2:
                lab = fmt_value((hi + lo) / 2)
            else:
                lab = ""
            out.append([(lab.rjust(label_w)[:label_w] + " ", "grey62"), *line])
        pad = (" " * (label_w + 1), None)
        out.append([pad, *self._alert_axis(main, cw)])
        out.append([pad, *self._x_axis(store, view, cw)])
        return out

    def render(self) -> Text:
        """The chart as text (what `render_line` draws; for tests and exports)."""
        return runs_text(self.rows())

    def render_line(self, y: int) -> Strip:
        w, h = self.content_size
        base = self.visual_style.rich_style
        rows = self.rows(w, h)
        if not self._strips or self._strips_base != base:
            self._strips_base = base
            self._strips = [self._strip(r, w, base) for r in rows]
        return self._strips[y] if y < len(self._strips) else Strip.blank(w, base)

    def _alert_axis(self, main: list[Bucket | None], cw: int) -> Runs:
        """A row under the chart with a mark where an alert fired."""
        cells = [" "] * cw
        styles: list[str | None] = [None] * cw
        steps = [b.step if b is not None else None for b in main]
        for step, sev in self.model.alert_marks(self.metric):
            # the first dot column whose last step reaches the alert's step
            for x, s in enumerate(steps):
                if s is not None and s >= step:
                    if x // 2 < cw:
                        cells[x // 2] = "▲"
                        styles[x // 2] = SEVERITY_STYLE.get(sev, "yellow")
                    break
        out: Runs = []
        for c, s in zip(cells, styles):
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0] + c, s)
            else:
                out.append((c, s))
        return out

    def _x_axis(self, store: RunStore, view: ChartView, cw: int) -> Runs:
        a, b = view.rows(store)
        if b <= a:
            return []
        if view.time_axis:
            t0 = store.times[0] if len(store) else 0.0
            left = _fmt_duration(store.times[a] - t0)
            right = _fmt_duration(store.times[b - 1] - t0)
        else:
            left, right = f"step {store.steps[a]:,}", f"step {store.steps[b - 1]:,}"
        pad = max(1, cw - len(left) - len(right))
        return [((left + " " * pad + right)[:cw], "grey62")]


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(max(0, s))
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
