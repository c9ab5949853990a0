"""Metric tiles (the grid) and the detail chart of the selected metric."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual import events
from textual.geometry import Region
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from protocol.alerts import DEFAULT_RULES
from protocol.catalogue import METRICS
from protocol.text import safe_text

from ..braille import ChartSpec, HLine, Line, Runs, draw_runs, ema, finite_range, fmt_value, padded
from ..glyphs import MODE, g
from ..health import level_for, threshold_values
from ..model import RunModel
from ..overlay import Comparison, column_of, fmt_x, overlay_lines, shared_y
from ..store import COMPANIONS, Bucket, RunStore
from .lines import Cell, cells_of, changed_spans, segments, text_runs

LEVEL_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red", "none": "grey50"}
# a tile's chart line by the state of its metric (no thresholds: calm cyan)
LINE_STYLE = {"ok": "green", "warning": "yellow", "critical": "red", "none": "bright_cyan"}
BAND_STYLE = "grey39"
# NO_COLOR: the state as a word before the value as well
LEVEL_WORD = {"warning": "WARN ", "critical": "CRIT "}
EMA_WEIGHTS = (0.6, 0.8, 0.9, 0.95, 0.99)
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
    ema_weight: float = 0.9  # TensorBoard's smoothing factor
    live: bool = False  # a live run: windows grow at the right edge instead of moving
    cursor: int | None = None  # the detail chart's value cursor, a cell column of its plot
    x_axis: str = "step"  # comparing runs: step, time (since each run's start) or tokens

    def rows(self, store: RunStore) -> tuple[int, int]:
        if self.around_step is not None:
            return store.index_range(self.zoom or 200, self.around_step)
        return store.index_range(self.zoom)

    def window(self, store: RunStore, dots: int) -> tuple[int, int, int | None]:
        """Rows [a, b) shown on `dots` dot columns, and how many rows the full width spans
        (None: [a, b) is stretched over the width). On a live run the window is anchored, so
        a new record changes the last column only: a last-N view jumps forward by N/4 when
        full; a whole-run view puts 1, 2, 5, 10... rows in a column and rescales when full."""
        a, b = self.rows(store)
        if not self.live or self.around_step is not None or self.time_axis or dots < 2:
            return a, b, None
        n = len(store)
        if self.zoom is not None:
            if n <= self.zoom:
                return 0, n, self.zoom
            step = max(1, self.zoom // 4)
            a = ((n - self.zoom) // step + 1) * step
            return a, n, self.zoom
        if n <= dots:
            return 0, n, dots
        return 0, n, _ladder(-(-n // dots)) * dots

    def describe(self, comparing: bool = False) -> str:
        """What the charts show, for the detail chart's title."""
        d = g("dot")
        z = "whole run" if self.zoom is None else f"last {self.zoom:,}"
        x = f"x={'time' if self.time_axis else 'step'}"
        if comparing:
            z = "all runs whole" if self.zoom is None else f"last {self.zoom:,} steps"
            x = f"aligned by {self.x_axis}"
        if self.around_step is not None:
            z = f"{self.zoom or 200:,}{' steps' if comparing else ''} around step {self.around_step:,}"
        smooth = f"EMA {self.ema_weight:g}" if self.smooth else "raw"
        return f"{z} {d} {smooth} {d} {x}"


def _ladder(x: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... that is >= x."""
    m = 1
    while True:
        for k in (1, 2, 5):
            if k * m >= x:
                return k * m
        m *= 10


def buckets_for(
    store: RunStore, key: str, a: int, b: int, n: int, time_axis: bool, span: int | None = None
) -> list[Bucket | None]:
    """Rows [a, b) of `key` as n buckets, by row (step axis) or by wall time (gaps stay gaps).

    Fewer rows than dot columns are stretched over the whole width (each row repeated over
    its share of the columns), so the x axis always spans the chart and its labels are true.
    With `span` (a live run's anchored window), column k holds rows a + span*k//n .. and the
    columns past row b are empty: the chart grows at its right edge."""
    if span is not None and not time_axis:
        col = store.columns[key]
        out_g: list[Bucket | None] = []
        for k in range(n):
            s0 = a + span * k // n
            e0 = min(b, a + span * (k + 1) // n)
            if e0 <= s0:
                out_g.append(None if s0 >= b else (out_g[-1] if out_g else None))
                continue
            lo, hi, fl = col.range_summary(s0, e0)
            out_g.append(Bucket(lo, hi, col.values[e0 - 1], fl, store.steps[e0 - 1]))
        return out_g
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
    store: RunStore,
    key: str,
    view: ChartView,
    width: int,
    height: int,
    thresholds: bool,
    rules=None,
    style: str = "bright_cyan",
    cursor: int | None = None,
) -> tuple[list[Runs], tuple[float, float] | None, list]:
    """The chart of `key` as rows of styled runs, its y range, and the main line's buckets."""
    a, b, span = view.window(store, width * 2)
    lines: list[Line] = []
    comp = COMPANIONS.get(key)
    if comp and comp in store.columns and store.columns[comp].present:
        lines.append(Line(buckets_for(store, comp, a, b, width * 2, view.time_axis, span), "grey62", markers=False))
    main = buckets_for(store, key, a, b, width * 2, view.time_axis, span)
    if view.smooth:
        lines.append(Line(main, "grey42", markers=True))
        per = (b - a) / max(1, width * 2)
        lines.append(Line(ema(main, view.ema_weight, per), style, markers=False))
    else:
        lines.append(Line(main, style, band=BAND_STYLE))
    hl: list[HLine] = []
    yr = finite_range(lines)
    if thresholds and yr:
        lo, hi = yr
        span_y = (hi - lo) or abs(hi) or 1.0
        for y, sev in threshold_values(key, rules if rules is not None else DEFAULT_RULES):
            hl.append(HLine(y, SEVERITY_STYLE.get(sev, "yellow")))
            if lo - span_y <= y <= hi + span_y:  # near enough to be worth the squashing
                lo, hi = min(lo, y), max(hi, y)
        yr = (lo, hi)
    yr = padded(*yr) if yr else None
    if yr and view.live:
        yr = nice_range(*yr)  # a scale that moves in steps: fewer whole-chart redraws
    return draw_runs(ChartSpec(width, height, lines, hl, yr, ascii=MODE.ascii, cursor=cursor)), yr, main


def nice_range(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened to multiples of a round step (1, 2, 5 x 10^k) of about a quarter of it."""
    span = hi - lo
    if not (span > 0) or not math.isfinite(span):
        return lo, hi
    raw = span / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(k * mag for k in (1, 2, 5, 10) if k * mag >= raw)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step


def compare_chart(comparison: Comparison, key: str, view: ChartView, width: int, height: int, rules=None):
    """Every compared run's `key` in its colour over the common x window: rows of runs, the y
    range, each run's buckets and the window. Thresholds (the first run's rules) with `rules`."""
    lines, win, per_run = overlay_lines(
        comparison.runs,
        key,
        view.x_axis,
        view.zoom,
        view.around_step,
        width * 2,
        view.ema_weight if view.smooth else None,
        live=view.live,
    )
    hl: list[HLine] = []
    yr, off = shared_y([finite_range([ln]) for ln in lines])
    off_run = next((r for r in comparison.runs if off is not None and r.colour == lines[off].style), None)
    if rules is not None and yr:
        lo, hi = yr
        span_y = (hi - lo) or abs(hi) or 1.0
        for y, sev in threshold_values(key, rules):
            hl.append(HLine(y, SEVERITY_STYLE.get(sev, "yellow")))
            if lo - span_y <= y <= hi + span_y:
                lo, hi = min(lo, y), max(hi, y)
        yr = (lo, hi)
    yr = padded(*yr) if yr else None
    if yr and view.live:
        yr = nice_range(*yr)  # a scale that moves in steps: fewer whole-chart redraws
    rows = draw_runs(ChartSpec(width, height, lines, hl, yr, ascii=MODE.ascii, cursor=view.cursor if rules else None))
    return rows, yr, per_run, win, off_run


def compare_values(comparison: Comparison, metric: str, width: int) -> Text:
    """A tile's value line when comparing: each run's letter in its colour, its latest value in
    the colour of its own state ('A 0.0123  B 0.0151  C —')."""
    t = Text(no_wrap=True, overflow="ellipsis")
    for i, r in enumerate(comparison.runs):
        m = r.model
        value = m.store.value(metric)
        level = level_for(metric, value, m.open_alerts, m.rules)
        if i:
            t.append(" ")
        t.append(r.label, f"bold {r.colour}")
        word = LEVEL_WORD.get(level, "") if not MODE.color else ""
        t.append(f" {word}{fmt_value(value)}", LEVEL_STYLE[level])
    t.truncate(width, overflow="ellipsis")
    return t


def fmt_compact(v: float) -> str:
    """A y-scale label in at most 5 cells: 0.125, -0.12, 1.2k, 3e-4."""
    if not math.isfinite(v):
        return fmt_value(v)[:5]
    a = abs(v)
    if a < 1e-12:
        return "0"
    if a >= 1000:
        for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if a >= div:
                t = f"{v / div:.2g}{suf}"
                return t if len(t) <= 5 else f"{v / div:.0f}{suf}"
    if a >= 0.01:
        for p in (3, 2, 1):
            t = f"{v:.{p}g}"
            if len(t) <= 5:
                return t
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


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
    Textual only asks again for lines marked dirty; of a line, only the cells that differ from
    what was drawn before are marked (`lines.changed_span`): what goes over the link is what changed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._styles: dict = {}
        self._shown: dict[int, list[Cell]] = {}  # line y -> the cells last marked for drawing
        self._marked: dict[int, Runs] = {}  # line y -> the runs those cells are of (not copied)

    def _strip(self, runs: Runs, width: int, base: Style) -> Strip:
        """Runs hold one-cell characters only (braille, box drawing, ASCII): lengths are cells."""
        return Strip(segments(runs, base, self._styles)).adjust_cell_length(width, base)

    def _text_strip(self, text: Text, width: int, base: Style) -> Strip:
        return self._strip(text_runs(text, self.app.console), width, base)

    def _mark_changed(self, y: int, runs: Runs) -> bool:
        """Mark dirty the span of line `y` whose cells differ from what was drawn there (True
        if any did)."""
        new = cells_of(runs)
        spans = changed_spans(self._shown.get(y), new)
        self._shown[y] = new
        self._marked[y] = runs
        if spans:
            self.refresh(*(Region(x0, y, x1 - x0, 1) for x0, x1 in spans))
        return bool(spans)

    def _drawing(self, y: int, runs: Runs) -> None:
        """`render_line` draws `runs` at line `y`: what is shown there (the cells are not counted
        again when they are the runs last marked)."""
        if self._marked.get(y) is not runs:
            self._shown[y] = cells_of(runs)
            self._marked[y] = runs

    def _forget_shown(self) -> None:
        self._shown = {}
        self._marked = {}

    def on_resize(self) -> None:
        self._forget_shown()  # Textual repaints the whole widget after a resize


UNIT_SHORT = {"nats/token": "nats", "tokens/s": "tok/s", "tokens": "tok", "score": ""}
COMPANION_LABEL = {"kl_target": ("kl_target", "target", "tgt"), "gold_reward_mean": ("gold_reward", "gold", "gold")}


def value_label(
    metric: str,
    value: float | None,
    comp: str | None,
    comp_value: float | None,
    level: str,
    width: int,
    pad_to: int = 0,
) -> Text:
    """The value line of a tile, made to fit `width` cells: the unit is shortened, then dropped,
    the companion's name shortened, before anything is cut. The value itself always shows.
    `pad_to`: the value takes at least this many cells, so that a value one character longer
    or shorter does not move (and resend) the rest of the line."""
    val = fmt_value(value).ljust(pad_to)
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
    app's frame rate, the chart at the (lower) chart rate, each only where it changed. The
    chart's line has the colour of the metric's state; a compact y scale is on its left."""

    selected: reactive[bool] = reactive(False)

    class Clicked(Message):
        def __init__(self, tile: MetricTile):
            super().__init__()
            self.tile = tile

    def __init__(self, metric: str, model: RunModel, view: ChartView, comparison: Comparison | None = None, **kw):
        super().__init__(**kw)
        self.model, self.view = model, view
        self.comparison = comparison  # several runs: each drawn in its colour (tui/overlay.py)
        self.metric = metric
        self.border_title = metric
        self.chart_version = 0  # bumped by the app when the chart should be drawn again
        self._value_w = 0
        self._body_key = None
        self._body: list[Runs] = []
        self._head: tuple[int, Runs] | None = None  # (width, runs) of the value line marked, not drawn yet

    def set_metric(self, metric: str) -> None:
        if metric != self.metric:
            self.metric = metric
            self._value_w = 0
            self._head = None
            self.border_title = metric
            self.chart_version += 1
            self._forget_shown()
            self.refresh()

    def watch_selected(self, selected: bool) -> None:
        self.set_class(selected, "-selected")

    def on_click(self, event: events.Click) -> None:
        self.post_message(self.Clicked(self))

    # -- what is shown ----------------------------------------------------------------

    def level(self) -> str:
        return level_for(self.metric, self.model.store.value(self.metric), self.model.open_alerts, self.model.rules)

    def head_text(self, width: int | None = None) -> Text:
        width = self.content_size.width if width is None else width
        if self.comparison is not None and self.comparison.active:
            return compare_values(self.comparison, self.metric, width)
        store = self.model.store
        value = store.value(self.metric)
        comp = COMPANIONS.get(self.metric)
        comp = comp if comp and comp in store.columns and store.columns[comp].present else None
        cval = store.value(comp) if comp else None
        level = level_for(self.metric, value, self.model.open_alerts, self.model.rules)
        word = LEVEL_WORD.get(level, "") if not MODE.color else ""
        # a value one character shorter than the widest shown so far keeps its width: the usual
        # jitter (0.09871 / 0.1271) then does not move, and resend, the rest of the line
        shown = fmt_value(value)
        self._value_w = max(self._value_w, len(shown))
        pad = min(self._value_w, len(shown) + 1)
        head = value_label(self.metric, value, comp, cval, level, max(1, width - len(word)), pad)
        if word:
            head = Text(word, "bold") + head
        return head

    def body_runs(self, width: int | None = None, height: int | None = None) -> list[Runs]:
        w = self.content_size.width if width is None else width
        h = (self.content_size.height if height is None else height) - 1
        store = self.model.store
        empty = not self._any_records()
        key = (self.chart_version, w, h, empty)
        if key != self._body_key:
            self._body_key = key
            if empty or h < 1:
                self._body = [[(f"waiting for records{g('ellipsis')}", "grey50")]]
            else:
                self._body = self._chart(store, w, h)
        return self._body

    def _any_records(self) -> bool:
        if self.comparison is not None and self.comparison.active:
            return any(len(r.model.store) for r in self.comparison.runs)
        return bool(len(self.model.store))

    def _chart(self, store: RunStore, w: int, h: int) -> list[Runs]:
        label_w = 5 if w >= 20 and h >= 2 else 0  # the compact y scale
        cw = w - label_w - (1 if label_w else 0)
        if self.comparison is not None and self.comparison.active:
            rows, yr, _per_run, _win, _off = compare_chart(self.comparison, self.metric, self.view, cw, h)
        else:
            style = LINE_STYLE[self.level()]
            rows, yr, _main = chart_lines(store, self.metric, self.view, cw, h, thresholds=False, style=style)
        if not label_w:
            return rows
        lo, hi = yr if yr else (math.nan, math.nan)
        out = []
        for i, r in enumerate(rows):
            lab = fmt_compact(hi) if i == 0 and yr else fmt_compact(lo) if i == len(rows) - 1 and yr else ""
            out.append([(lab.rjust(label_w)[:label_w] + " ", "grey50"), *r])
        return out

    def render(self) -> Text:
        """The tile as text (what `render_line` draws; for tests and exports)."""
        return Text("\n").join([self.head_text(), runs_text(self.body_runs())])

    # -- refresh --------------------------------------------------------------------------

    def refresh_value(self) -> None:
        """Mark the cells of the value line that changed; `render_line` draws the same runs."""
        width = self.content_size.width
        runs = text_runs(self.head_text(width), self.app.console)
        self._head = (width, runs) if self._mark_changed(0, runs) else None

    def redraw_chart(self) -> None:
        """Draw the chart again from the data as it is now; mark only the cells that changed."""
        self.chart_version += 1
        for i, r in enumerate(self.body_runs()):
            self._mark_changed(i + 1, r)

    # -- Line API ------------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        w, h = self.content_size
        base = self.visual_style.rich_style
        if y == 0:
            head, self._head = self._head, None
            runs = head[1] if head is not None and head[0] == w else text_runs(self.head_text(w), self.app.console)
        else:
            rows = self.body_runs(w, h)
            runs = rows[y - 1] if y - 1 < len(rows) else []
        self._drawing(y, runs)
        return self._strip(runs, w, base)


class DetailChart(StripWidget):
    """The selected metric, larger: thresholds, alert markers, EMA, step or time axis, a
    legend, and the value cursor (keys or a click) that reads step, time and value."""

    metric: reactive[str] = reactive("kl")

    class CursorAt(Message):
        def __init__(self, column: int):
            super().__init__()
            self.column = column

    LABEL_W = 10

    def __init__(self, model: RunModel, view: ChartView, comparison: Comparison | None = None, **kw):
        super().__init__(**kw)
        self.model, self.view = model, view
        self.comparison = comparison
        self.chart_version = 0
        self._key = None
        self._rows: list[Runs] = []
        self._main: list[Bucket | None] = []

    def watch_metric(self) -> None:
        self._forget_shown()
        self.refresh()

    @property
    def comparing(self) -> bool:
        return self.comparison is not None and self.comparison.active

    def update_title(self) -> None:
        view = self.view.describe(self.comparing)
        title = f"{self.metric} {g('dot')} {view}"
        if title != self.border_title:
            self.border_title = title

    def plot_width(self, w: int | None = None) -> int:
        w = self.content_size.width if w is None else w
        return max(1, w - self.LABEL_W - 1)

    def redraw_chart(self) -> None:
        """Draw the chart again from the data as it is now; mark only the cells that changed."""
        self.chart_version += 1
        self.update_title()
        for i, r in enumerate(self.rows()):
            self._mark_changed(i, r)
        for y in [y for y in self._shown if y >= len(self._rows)]:
            self._mark_changed(y, [])

    def rows(self, w: int | None = None, h: int | None = None) -> list[Runs]:
        w = self.content_size.width if w is None else w
        h = self.content_size.height if h is None else h
        key = (self.chart_version, self.metric, w, h, not len(self.model.store), self.comparing)
        if key != self._key:
            self._key = key
            self._rows = self._compute_compare(w, h) if self.comparing else self._compute(w, h)
        return self._rows

    def _compute_compare(self, w: int, h: int) -> list[Runs]:
        """Every compared run over a common x axis: its line in its colour, the first run's
        thresholds, each run's alert marks in its colour, a legend naming the runs."""
        comparison, view = self.comparison, self.view
        assert comparison is not None
        runs = comparison.runs
        if h < 5 or w < 24 or not any(len(r.model.store) for r in runs):
            return [[(f"waiting for records{g('ellipsis')}", "grey50")]]
        if not any(self.metric in r.model.store.columns for r in runs):
            return [[(f"{self.metric}: in none of these runs", "grey50")]]
        label_w = self.LABEL_W
        cw = self.plot_width(w)
        cursor = view.cursor if view.cursor is not None and view.cursor < cw else None
        body, yr, per_run, win, off_run = compare_chart(
            comparison, self.metric, view, cw, h - 3, rules=self.model.rules
        )
        self._main = per_run[0] if per_run else []
        lo, hi = yr if yr else (0.0, 1.0)
        out: list[Runs] = []
        for i, line in enumerate(body):
            lab = fmt_value(hi) if i == 0 else fmt_value(lo) if i == len(body) - 1 else ""
            out.append([(lab.rjust(label_w)[:label_w] + " ", "grey62"), *line])
        pad = (" " * (label_w + 1), None)
        out.append([pad, *self._compare_alert_axis(win, cw)])
        if win is not None:
            left, right = fmt_x(view.x_axis, win[0]), fmt_x(view.x_axis, win[1])
            gap = max(1, cw - len(left) - len(right))
            out.append([pad, ((left + " " * gap + right)[:cw], "grey62")])
        else:
            out.append([pad])
        out.append([pad, *self._compare_legend(per_run, cw, cursor, off_run)])
        return out

    def _compare_alert_axis(self, win: tuple[float, float] | None, cw: int) -> Runs:
        """A mark where each run's alerts fired, in that run's colour."""
        cells: list[tuple[str, str | None]] = [(" ", None)] * cw
        if win is not None and self.comparison is not None:
            for r in reversed(self.comparison.runs):  # the first run's marks drawn last: on top
                store = r.model.store
                for step, _sev in r.model.alert_marks(self.metric):
                    x = column_of(store, self.view.x_axis, step, win[0], win[1], cw * 2)
                    if x is not None:
                        cells[x // 2] = (g("up"), f"bold {r.colour}")
        out: Runs = []
        for c, st in cells:
            if out and out[-1][1] == st:
                out[-1] = (out[-1][0] + c, st)
            else:
                out.append((c, st))
        return out

    def _compare_legend(self, per_run: list[list[Bucket | None]], cw: int, cursor: int | None, off_run=None) -> Runs:
        """Which colour is which run, or with the cursor on: each run's value there."""
        assert self.comparison is not None
        runs: Runs = []
        line = "━" if not MODE.ascii else "-"
        for r, buckets in zip(self.comparison.runs, per_run):
            if cursor is not None:
                b = next((buckets[x] for x in (2 * cursor + 1, 2 * cursor) if x < len(buckets) and buckets[x]), None)
                val = f"{fmt_value(b.last)} @{b.step:,}" if b is not None else g("dash")
                runs.append((f"{r.label} {val}  ", f"bold {r.colour}"))
            else:
                runs.append((f"{line} {r.label} {safe_text(r.name, 28)}  ", r.colour))
        if cursor is None and off_run is not None:  # its line rides the edge past where it left the others
            runs.append((f"{off_run.label} off the scale  ", f"bold {off_run.colour}"))
        if cursor is None and any(r.model.alert_marks(self.metric) for r in self.comparison.runs):
            runs.append((f"{g('up')} alert fired", "grey62"))
        out: Runs = []
        n = 0
        for chars, st in runs:
            if n + len(chars) > cw:
                out.append((chars[: max(0, cw - n)], st))
                break
            out.append((chars, st))
            n += len(chars)
        return out

    def _compute(self, w: int, h: int) -> list[Runs]:
        store, view = self.model.store, self.view
        if not len(store) or h < 5 or w < 24:
            return [[(f"waiting for records{g('ellipsis')}", "grey50")]]
        if self.metric not in store.columns:
            return [[(f"{self.metric}: not in this run", "grey50")]]
        label_w = self.LABEL_W
        cw = self.plot_width(w)
        cursor = view.cursor if view.cursor is not None and view.cursor < cw else None
        body, yr, main = chart_lines(
            store, self.metric, view, cw, h - 3, thresholds=True, rules=self.model.rules, cursor=cursor
        )
        self._main = main
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
        out.append([pad, *self._x_axis(store, view, cw, main)])
        out.append([(" " * (label_w + 1), None), *self._legend_or_cursor(store, main, cw, cursor)])
        return out

    def _legend_or_cursor(self, store: RunStore, main: list[Bucket | None], cw: int, cursor: int | None) -> Runs:
        """The legend (what each line is), or with the cursor on: what it reads."""
        if cursor is not None:
            b = next((main[x] for x in (2 * cursor + 1, 2 * cursor) if x < len(main) and main[x] is not None), None)
            if b is None:
                return [("cursor: no record here  ([ ] move, \\ off)"[:cw], "grey62")]
            i = bisect_left(store.steps, b.step)
            t0 = store.times[0] if len(store) else math.nan
            when = _fmt_duration(store.times[i] - t0) if i < len(store) else "?"
            text = f"step {b.step:,} {g('dot')} {when} {g('dot')} {self.metric} {fmt_value(b.last)}"
            if b.hi > b.lo:
                text += f" (range {fmt_value(b.lo)}{g('range')}{fmt_value(b.hi)})"
            comp = COMPANIONS.get(self.metric)
            if comp and comp in store.columns and store.columns[comp].present and i < len(store):
                text += f"  {comp} {fmt_value(store.value(comp, i))}"
            return [(text[:cw], "bold")]
        line = "━" if not MODE.ascii else "-"
        runs: Runs = [(f"{line} {self.metric}", "bright_cyan")]
        comp = COMPANIONS.get(self.metric)
        if comp and comp in store.columns and store.columns[comp].present:
            runs.append((f"  {line} {comp}", "grey62"))
        if self.view.smooth:
            runs.append((f"  (EMA {self.view.ema_weight:g}; raw in grey)", "grey62"))
        elif not MODE.ascii:
            runs.append(("  ░ min/max", BAND_STYLE))
        if threshold_values(self.metric, self.model.rules):
            runs.append((f"  {g('hline') * 2} warning", "yellow"))
            runs.append((f"  {g('hline') * 2} critical", "red"))
        if self.model.alert_marks(self.metric):
            runs.append((f"  {g('up')} alert fired", "yellow"))
        out: Runs = []
        n = 0
        for chars, st in runs:
            if n + len(chars) > cw:
                break
            out.append((chars, st))
            n += len(chars)
        return out

    def on_click(self, event: events.Click) -> None:
        off = event.get_content_offset(self)
        if off is not None:
            x = off.x - self.LABEL_W - 1
            if 0 <= x < self.plot_width():
                self.post_message(self.CursorAt(x))

    def render(self) -> Text:
        """The chart as text (what `render_line` draws; for tests and exports)."""
        return runs_text(self.rows())

    def render_line(self, y: int) -> Strip:
        w, h = self.content_size
        base = self.visual_style.rich_style
        rows = self.rows(w, h)
        runs = rows[y] if y < len(rows) else []
        self._drawing(y, runs)
        return self._strip(runs, w, base)

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
                        cells[x // 2] = g("up")
                        styles[x // 2] = SEVERITY_STYLE.get(sev, "yellow")
                    break
        out: Runs = []
        for c, s in zip(cells, styles):
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0] + c, s)
            else:
                out.append((c, s))
        return out

    def _x_axis(self, store: RunStore, view: ChartView, cw: int, main: list[Bucket | None]) -> Runs:
        a, b, span = view.window(store, cw * 2)
        if b <= a:
            return []
        if view.time_axis:
            t0 = store.times[0] if len(store) else 0.0
            left = _fmt_duration(store.times[a] - t0)
            right = _fmt_duration(store.times[b - 1] - t0)
        else:
            last = store.steps[b - 1]
            if span is not None and span > b - a:  # the window's right edge is ahead of the run
                per = (store.steps[b - 1] - store.steps[a]) / (b - 1 - a) if b - 1 > a else 1.0
                last = store.steps[a] + int(round((span - 1) * per))
            left, right = f"step {store.steps[a]:,}", f"step {last:,}"
        pad = max(1, cw - len(left) - len(right))
        return [((left + " " * pad + right)[:cw], "grey62")]


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(max(0, s))
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
