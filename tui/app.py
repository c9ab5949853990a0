"""`MonitorApp`: the wiring of the monitor's parts.

readers (follow.py, threads) --messages--> app --apply--> RunModel (model.py)
app --two frame rates (frames.py)--> widgets, which were handed the model and the ChartView
keys --> reactive view settings --> charts drawn again at once
terminal size --> layout classes (layout.py) --> monitor.tcss
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen

from protocol.alerts import Alert
from protocol.health import acknowledge, load_acks
from protocol.rundir import RunPaths, list_checkpoints
from protocol.text import safe_text

from .adapted import AdaptedPaths
from .comparing import TOKENS, ComparingMixin
from .feed import TAIL_BYTES
from .follow import (
    CaughtUp,
    FeedFailed,
    FeedMessage,
    HistoryLoaded,
    HistoryProgress,
    LatestMoved,
    RecordsRead,
    RunFollower,
    TargetResolved,
    one_line,
    post,
    resolve_target,
    spawn,
)
from .frames import Throttle, rates
from .glyphs import MODE, AsciiFilter, configure
from .layout import TooSmall, layout_for, screen_classes, tiles_shown
from .model import RunModel
from .overlay import Comparison
from .samples import SamplesScreen
from .screens import AlertListScreen, HelpScreen, MetricPickerScreen, RunPickerScreen, RunRow
from .store import CHART_METRICS
from .system import BoxHistory, BoxSample, LocalBox
from .widgets.charts import EMA_WEIGHTS, ZOOM_STEPS, ChartView, DetailChart, MetricTile
from .widgets.panels import (
    EVENT_FILTERS,
    AlertBanner,
    CompareLegend,
    EventsPanel,
    KeyBar,
    ProfilerPanel,
    RunHeader,
)
from .widgets.system import BoxPanel
from .widgets.verify import VerifyPanel
from .wire import crop_both_ends

GRID_COLS = 3
WHOLE_RUN_SLOWER = 2


class MonitorApp(ComparingMixin, App):
    CSS_PATH = Path(__file__).with_name("monitor.tcss")
    TITLE = "rlhf-tui"
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "keys"),
        Binding("a", "alerts", "alerts"),
        Binding("w", "samples", "samples"),
        Binding("c", "acknowledge", "acknowledge"),
        Binding("r", "runs", "runs"),
        Binding("left,h", "move(-1)", "", show=False),
        Binding("right,l", "move(1)", "", show=False),
        Binding("up,k", f"move({-GRID_COLS})", "", show=False),
        Binding("down,j", f"move({GRID_COLS})", "", show=False),
        Binding("m", "pick_metric", "metric"),
        Binding("left_square_bracket", "cursor(-1)", "", show=False),
        Binding("right_square_bracket", "cursor(1)", "", show=False),
        Binding("left_curly_bracket", "cursor(-10)", "", show=False),
        Binding("right_curly_bracket", "cursor(10)", "", show=False),
        Binding("backslash", "cursor_off", "", show=False),
        Binding("e", "event_filter", "events"),
        Binding("p", "toggle_panels", "panels"),
        Binding("g", "toggle_box", "", show=False),
        Binding("d", "toggle_detail", "", show=False),
        Binding("S", "ema_weight", "", show=False),
        Binding("s", "toggle('smooth')", "EMA"),
        Binding("t", "x_axis", "x axis"),
        Binding("z", "zoom", "zoom"),
        Binding("f", "follow", "follow"),
        Binding("1", "verify('m1')", "M1"),
        Binding("2", "verify('m2')", "M2"),
        Binding("3", "verify('m3')", "M3"),
        Binding("x", "cancel_verify", "cancel", show=False),
    ]

    # the view settings: the keys change these, their watchers draw the charts again
    selected: reactive[int] = reactive(0, init=False)  # index of the selected tile
    detail_metric: reactive[str] = reactive("kl", init=False)  # what the detail chart shows
    cursor: reactive[int | None] = reactive(None, init=False)  # the detail chart's value cursor
    ema_weight: reactive[float] = reactive(0.9, init=False)
    event_filter: reactive[str] = reactive("all", init=False)
    panels_shown: reactive[bool | None] = reactive(None, init=False)  # None: as the size suits
    detail_shown: reactive[bool] = reactive(True, init=False)
    box_shown: reactive[bool] = reactive(True, init=False)  # the box panel (GPUs, CPU, RAM)
    smooth: reactive[bool] = reactive(False, init=False)
    time_axis: reactive[bool] = reactive(False, init=False)
    zoom: reactive[int | None] = reactive(None, init=False)
    around_step: reactive[int | None] = reactive(None, init=False)  # after a jump to an alert

    def __init__(
        self,
        target: str | os.PathLike,
        fps: float = 5.0,
        stall_after: float = 60.0,
        chart_fps: float | None = None,
        clock: Callable[[], float] = time.time,
        tail_bytes: int = TAIL_BYTES,
        live: bool = True,
        bell: bool = True,
        ascii: bool | None = None,
        ema_weight: float = 0.9,
        box: bool | None = None,
        compare: tuple = (),
    ):
        # before App.__init__, which takes NO_COLOR out of the environment
        configure(ascii)
        super().__init__()
        if MODE.ascii:
            self._filters.append(AsciiFilter())  # nothing but ASCII reaches the terminal
        crop_both_ends()  # a changed span is written alone, not from its widget's left edge (wire.py)
        self.target = Path(target)
        # one rate governs every frame: values at `fps`, charts and panels slower (frames.rates)
        chart_fps_asked = chart_fps
        fps, chart_fps, self.panel_interval = rates(fps, chart_fps)
        self.set_reactive(MonitorApp.ema_weight, ema_weight)
        self.stall_after = stall_after
        self.clock = clock  # injected so snapshots are deterministic
        self.tail_bytes = tail_bytes
        self.live = live  # False: read what is there once, no watcher (snapshots)
        self.model = RunModel()
        self.view = ChartView()
        # the runs drawn over this one (`rlhf-tui A B ...`): (path, RemoteSync or None) each
        self.comparison = Comparison()
        self.comparison.add(self.model, str(target))
        self._compare_at_start = list(compare)
        self.runs_dir: Path | None = None  # followed as its `latest` moves
        self.follower: RunFollower | None = None
        self._token = 0  # which open of a run the readers' messages belong to
        self.values = Throttle(self, fps, self._draw_values)
        self.charts = Throttle(self, chart_fps, self._draw_charts)
        self._chart_interval = self.charts.interval
        # whole-run views at half the chart rate, unless the chart rate was asked for (--chart-fps)
        self._whole_run_slower = WHOLE_RUN_SLOWER if chart_fps_asked is None else 1
        self._panel_drawn_at = -1e9
        self._panel_late = False  # a redraw of the profiler is scheduled
        self.tile_metrics = list(CHART_METRICS)  # what each tile shows (m changes the selected one)
        self.layout_name = ""
        # what is on screen (tests and benchmarks read these)
        self.drawn_step: int | None = None  # last step of a value frame, and when
        self.drawn_at = 0.0
        self.chart_step: int | None = None  # last step of a chart frame
        self.first_full_screen_at: float | None = None
        self._acks_lock = threading.Lock()
        self.bell_enabled = bell  # ring once on each new critical alert of a live run (--no-bell: never)
        self._caught_up = False  # the run's file as it was at open is read: what follows is live
        self._critical_seen: set[tuple[object, object]] = set()  # (rule, first step) of critical alerts
        self._checkpoints_for: tuple[object, ...] | None = None  # what the last listing was asked for
        # the box the run trains on (tui/system.py): sampled on this box, or by the ssh:// loop on
        # the remote one (remote.attach); None = while the run is watched live
        self.box = BoxHistory()
        self.box_sampling = live if box is None else box
        self.set_reactive(MonitorApp.box_shown, self.box_sampling)
        self._local_box: LocalBox | None = None

    # -- layout -----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        m, v = self.model, self.view
        self.w_header = RunHeader(id="header")
        self.w_banner = AlertBanner(id="banner")
        c = self.comparison
        self.w_legend = CompareLegend(id="legend")
        self.w_tiles = [MetricTile(k, m, v, c, id=f"tile-{k}", classes="tile") for k in CHART_METRICS]
        self.w_detail = DetailChart(m, v, c, id="detail")
        self.w_profiler = ProfilerPanel(id="profiler")
        self.w_box = BoxPanel(id="box")
        self.w_box.display = self.box_shown
        self.w_verify = VerifyPanel(id="verify")
        self.w_verify.border_title = "checks"
        self.w_events = EventsPanel(id="events")
        self.w_too_small = TooSmall(id="too-small")
        yield self.w_header
        yield self.w_too_small
        yield self.w_legend
        yield self.w_banner
        with Horizontal(id="body"):
            with Vertical(id="left"):
                with Grid(id="grid"):
                    yield from self.w_tiles
                yield self.w_detail
            with Vertical(id="right"):
                yield self.w_box
                yield self.w_profiler
                yield self.w_verify
                yield self.w_events
        yield KeyBar(self.BINDINGS, id="keys")

    def on_mount(self) -> None:
        self.watch_selected(self.selected)
        self._apply_layout()
        spawn(resolve_target, self, self.target, name="open")
        for target, remote in self._compare_at_start:
            self.add_compare(target, remote)
        spawn(self._read_acks, name="acks")
        if self.box_sampling and getattr(self, "remote", None) is None:
            self._local_box = LocalBox(self.box_from_thread).start()
        self.set_interval(1.0, self._tick)

    # -- acknowledgements: per-user state (protocol.health), read and written off the UI thread --

    class AcksRead(Message):
        def __init__(self, acked: set[str], error: str = ""):
            super().__init__()
            self.acked, self.error = acked, error

    def _read_acks(self) -> None:
        post(self, self.AcksRead(load_acks()))

    def _write_acks(self, keys: list[str]) -> None:
        with self._acks_lock:
            try:
                msg = self.AcksRead(acknowledge(keys))
            except OSError as e:
                msg = self.AcksRead(set(keys), f"could not save the acknowledgement: {one_line(e)}")
        post(self, msg)

    def on_monitor_app_acks_read(self, msg: AcksRead) -> None:
        self.model.acked |= msg.acked
        if msg.error:
            self.notify(safe_text(msg.error, 200), severity="warning", markup=False)
        self._changed({"alerts"})

    def action_acknowledge(self) -> None:
        """Acknowledge every alert the verdict holds against the run (open or past): the banner
        and header stop warning about them; an alert that fires again is a new one."""
        keys = self.model.header_info(self.clock(), self.stall_after).verdict.unacknowledged
        if not keys:
            self.notify("nothing to acknowledge", markup=False)
            return
        self.model.acked |= set(keys)
        spawn(self._write_acks, keys, name="acks-write")
        self.notify(f"acknowledged {len(keys)} alert{'s' * (len(keys) != 1)}", markup=False)
        self._changed({"alerts"})

    # -- the readers' messages ---------------------------------------------------------

    def on_target_resolved(self, msg: TargetResolved) -> None:
        if msg.paths is None:
            self.exit(return_code=2, message=Text(f"rlhf-tui: {safe_text(msg.error, 300)}"))
        else:
            self.runs_dir = msg.runs_dir
            self.open_run(msg.paths)

    def open_run(self, paths: RunPaths) -> None:
        if self.follower is not None:
            self.follower.close()  # it ends at its next wake-up; its messages are dropped
        self._token = next(TOKENS)
        dup = self.comparison.by_root(paths.root)
        if dup is not None and dup.model is not self.model:
            self.remove_compare(dup)  # the run now on screen as A is not compared with itself
        self.model.reset(paths)
        self.around_step = None
        self.chart_step = None
        self.w_verify.run_dir = paths.root
        self._caught_up = False
        self._critical_seen = set()
        self._checkpoints_for = None
        self.follower = RunFollower(self, paths, self._token, self.runs_dir, self.tail_bytes, self.live).start()
        self._changed({"all"})

    def _current(self, msg: FeedMessage) -> bool:
        return msg.token == self._token

    def on_records_read(self, msg: RecordsRead) -> None:
        try:
            if not self._current(msg):
                self.compared_message(msg)
            else:
                changed = self.model.apply_batch(msg.batch, self.clock())
                self._ring_on_new_critical(msg.batch.alerts)
                if "reset" in changed:
                    self.around_step = None
                self._changed(changed)
        finally:
            msg.done.set()  # the reader may read on

    def on_history_progress(self, msg: HistoryProgress) -> None:
        if not self._current(msg):
            self.compared_message(msg)
        else:
            self.model.loading = f"loading history {msg.frac:.0%}"
            self.values.request()

    def on_history_loaded(self, msg: HistoryLoaded) -> None:
        if not self._current(msg):
            self.compared_message(msg)
        else:
            if msg.result is None:  # the tail was the whole log
                self.model.history_done = True
            else:
                told = msg.result[1] + (msg.tail.alerts if msg.tail is not None else [])
                self._critical_seen |= {k for k in map(_critical_key, told) if k is not None}
                self._changed(self.model.apply_history(msg.result, msg.tail))

    def on_caught_up(self, msg: CaughtUp) -> None:
        if self._current(msg):
            self._caught_up = True

    # -- the bell: once on each new critical alert of a live run -----------------------------------

    def _ring_on_new_critical(self, alerts: list[tuple[str, Alert]]) -> None:
        """Ring once for each critical alert (rule, first step) not seen before; what the run's
        file held when it opened (its tail, its history) is remembered without a ring."""
        new = {k for k in map(_critical_key, alerts) if k is not None} - self._critical_seen
        if not new:
            return
        self._critical_seen |= new
        if self._caught_up and self.live and self.bell_enabled:
            self.bell()

    def on_latest_moved(self, msg: LatestMoved) -> None:
        if self._current(msg):
            self.notify(f"latest moved: now following {safe_text(msg.paths.run_id, 80)}", markup=False)
            self.open_run(msg.paths)

    def on_feed_failed(self, msg: FeedFailed) -> None:
        if not self._current(msg):
            self.compared_message(msg)
        else:
            self.model.fail(msg.text)
            self._changed({"alerts"})

    # -- drawing ------------------------------------------------------------------------

    def _changed(self, parts: set[str]) -> None:
        """The banner and the events panel change rarely: drawn at once. Values and charts go
        through their frame rates; the first records of a run draw their charts at once."""
        m = self.model
        everything = "all" in parts
        if everything or parts & {"alerts", "header"}:
            self._draw_health()
        if everything or "events" in parts:
            self._draw_events()
        if everything or self.chart_step is None and len(m.store):
            self.charts.soon()
        elif parts & {"data", "alerts"}:
            self.charts.request()
        self.values.request()

    def _draw_events(self) -> None:
        m = self.model
        self.w_events.show(m.events, self.w_events.content_size.height or 10, m.started_at, self.event_filter)

    def _draw_health(self) -> None:
        """The header and the banner: both from the run's verdict (unchanged text draws nothing)."""
        h = self.model.header_info(self.clock(), self.stall_after)
        self._want_checkpoints(h.verdict)
        self.w_header.show(h)
        rows = self.compare_rows(self.clock(), self.stall_after) if self.comparison.active else []
        if rows:
            rows[0] = (rows[0][0], h)
            self.w_legend.show(rows)
        self.w_banner.show(h, self.model, rows)
        live = self.live and any(hi.status == "running" for _r, hi in rows or [(None, h)])
        if live != self.view.live:  # a live run's charts grow at their right edge (ChartView.window)
            self.view.live = live
            self.charts.soon()

    # -- checkpoints, for the fork the banner suggests: listed off the UI thread ------------------

    class CheckpointsListed(Message):
        def __init__(self, token: int, steps: list[int]):
            super().__init__()
            self.token, self.steps = token, steps

    def _want_checkpoints(self, verdict) -> None:
        """List the run's checkpoints again when the alert a fork is suggested for changes (or
        every 10 s while one is: a live run writes new ones)."""
        paths = self.model.paths
        ep = self.model.fork_episode(verdict)
        if paths is None or ep is None or isinstance(paths, AdaptedPaths):
            return
        key = (self._token, ep.get("rule"), ep.get("first_step"), int(time.monotonic() // 10) if self.live else 0)
        if key != self._checkpoints_for:
            self._checkpoints_for = key
            spawn(self._list_checkpoints, paths, self._token, name="checkpoints")

    def _list_checkpoints(self, paths: RunPaths, token: int) -> None:
        post(self, self.CheckpointsListed(token, [step for step, _d in list_checkpoints(paths)]))

    def on_monitor_app_checkpoints_listed(self, msg: CheckpointsListed) -> None:
        if msg.token == self._token and msg.steps != self.model.checkpoint_steps:
            self.model.checkpoint_steps = msg.steps
            self._changed({"alerts"})

    # -- the box: samples come from a thread (LocalBox, or the ssh:// loop's RemoteBox) --------------

    class BoxSampled(Message):
        def __init__(self, sample: BoxSample):
            super().__init__()
            self.sample = sample

    def box_from_thread(self, sample: BoxSample) -> None:
        post(self, self.BoxSampled(sample))

    def on_monitor_app_box_sampled(self, msg: BoxSampled) -> None:
        self.add_box_sample(msg.sample)

    def add_box_sample(self, sample: BoxSample) -> None:
        self.box.add(sample)
        self._draw_box()

    def _draw_box(self) -> None:
        if self.box_shown:
            remote = getattr(self, "remote", None)
            where = f"on {remote.target.host}" if remote is not None else ""
            self.w_box.show(self.box, self.w_box.content_size.width or 52, where)  # on_resize: again

    def action_toggle_box(self) -> None:
        self.box_shown = not self.box_shown

    def watch_box_shown(self, shown: bool) -> None:
        self.w_box.display = shown
        if shown:
            self._draw_box()

    def _tick(self) -> None:
        """Once a second: ages, elapsed time, stalled status (the header and banner only)."""
        if not self.values.pending:
            self._draw_health()

    def _draw_values(self) -> None:
        for tile in self.w_tiles:
            tile.refresh_value()
        self._draw_health()
        self.drawn_step = self.model.store.last_step
        self.drawn_at = time.monotonic()
        self._check_first_screen()

    def _draw_charts(self) -> None:
        for tile in self.w_tiles:
            if tile.display:
                tile.redraw_chart()
        if self.detail_shown:
            self.w_detail.redraw_chart()
        # the profiler's text is drawn whole: at a slower rate than the charts (frames.rates), and
        # once more when that interval is up, so the last records show even when no more arrive
        now = time.monotonic()
        if now - self._panel_drawn_at >= self.panel_interval or self.chart_step is None:
            self._draw_profiler()
        elif not self._panel_late:
            self._panel_late = True
            self.set_timer(self._panel_drawn_at + self.panel_interval - now, self._draw_profiler)
        self.chart_step = self.model.store.last_step
        self._check_first_screen()

    def _draw_profiler(self) -> None:
        self._panel_drawn_at, self._panel_late = time.monotonic(), False
        self.w_profiler.show(self.model.store, self.w_profiler.content_size.width, self.comparison)

    def _check_first_screen(self) -> None:
        """Once values and charts show the same records, the history may load (the GIL is shared)."""
        if self.chart_step is not None and self.chart_step == self.drawn_step:
            if self.first_full_screen_at is None:
                self.first_full_screen_at = time.monotonic()
            if self.follower is not None:
                self.follower.first_screen.set()

    @property
    def settled(self) -> bool:
        """Everything read is drawn and no frame is waiting (tests, screenshots)."""
        last = self.model.store.last_step
        return (
            last is not None
            and self.drawn_step == last
            and self.chart_step == last
            and self.model.alerts_step == last
            and not self.values.pending
            and not self.charts.pending
        )

    @property
    def all_settled(self) -> bool:
        """`settled`, and every compared run's records read to the end and its alerts evaluated."""
        return self.settled and all(
            r.model.paths is not None and len(r.model.store) and r.model.alerts_step == r.model.store.last_step
            for r in self.comparison.runs[1:]
        )

    # -- keys -----------------------------------------------------------------------------

    def action_move(self, delta: int) -> None:
        self.selected = (self.selected + delta) % len(self.w_tiles)

    def action_x_axis(self) -> None:
        """Step or time; comparing runs: step, time since each run's start, or tokens."""
        if self.comparison.active:
            self.view.x_axis = self.cycle_x_axis()
            self.notify(f"runs aligned by {self.view.x_axis}", markup=False, timeout=2)
            self._view_changed()
        else:
            self.time_axis = not self.time_axis

    def _compare_layout(self) -> None:
        """The legend shows while runs are compared; charts and panels drawn again at once."""
        if hasattr(self, "w_legend") and self.is_mounted(self.w_legend):
            self.w_legend.screen.set_class(self.comparison.active, "-comparing")
            self._panel_drawn_at = -1e9
            self._changed({"all"})

    def action_toggle(self, setting: str) -> None:
        setattr(self, setting, not getattr(self, setting))

    def action_zoom(self) -> None:
        i = ZOOM_STEPS.index(self.zoom) if self.zoom in ZOOM_STEPS else 0
        self.zoom = ZOOM_STEPS[(i + 1) % len(ZOOM_STEPS)]

    def action_follow(self) -> None:
        self.around_step = None

    def action_ema_weight(self) -> None:
        i = EMA_WEIGHTS.index(self.ema_weight) if self.ema_weight in EMA_WEIGHTS else -1
        self.ema_weight = EMA_WEIGHTS[(i + 1) % len(EMA_WEIGHTS)]
        self.smooth = True
        self.notify(f"EMA smoothing factor {self.ema_weight:g}", markup=False, timeout=2)

    def action_cursor(self, delta: int) -> None:
        cw = self.w_detail.plot_width()
        if self.cursor is None:
            self.cursor = cw - 1 if delta < 0 else 0
        else:
            self.cursor = max(0, min(cw - 1, self.cursor + delta))

    def action_cursor_off(self) -> None:
        self.cursor = None

    def on_detail_chart_cursor_at(self, msg: DetailChart.CursorAt) -> None:
        self.cursor = msg.column

    def on_metric_tile_clicked(self, msg: MetricTile.Clicked) -> None:
        if msg.tile in self.w_tiles:
            self.selected = self.w_tiles.index(msg.tile)

    def action_event_filter(self) -> None:
        i = EVENT_FILTERS.index(self.event_filter) if self.event_filter in EVENT_FILTERS else 0
        self.event_filter = EVENT_FILTERS[(i + 1) % len(EVENT_FILTERS)]

    def watch_event_filter(self) -> None:
        self._draw_events()

    def action_toggle_panels(self) -> None:
        shown = self.panels_shown if self.panels_shown is not None else not layout_for(*self.size).narrow
        self.panels_shown = not shown

    def action_toggle_detail(self) -> None:
        self.detail_shown = not self.detail_shown

    def watch_panels_shown(self) -> None:
        self._apply_layout()

    def watch_detail_shown(self) -> None:
        self._apply_layout()
        self.charts.soon()

    def action_pick_metric(self) -> None:
        store = self.model.store
        names = [k for k in store.columns if store.columns[k].present]
        if not names:
            self.notify("no metrics yet", markup=False)
            return
        self.push_screen(MetricPickerScreen(names, self.detail_metric), self._metric_picked)

    def _metric_picked(self, name: str | None) -> None:
        if name is not None:
            self.tile_metrics[self.selected] = name
            self.w_tiles[self.selected].set_metric(name)
            self.detail_metric = name
            self.charts.soon()

    def watch_selected(self, selected: int) -> None:
        for k, tile in enumerate(self.w_tiles):
            tile.selected = k == selected
        self.detail_metric = self.tile_metrics[selected]
        self._page_tiles()
        self._view_changed()

    def watch_detail_metric(self, metric: str) -> None:
        self.w_detail.metric = metric
        self._view_changed()

    def _view_changed(self) -> None:
        v = self.view
        v.smooth, v.time_axis, v.zoom, v.around_step = self.smooth, self.time_axis, self.zoom, self.around_step
        v.ema_weight, v.cursor = self.ema_weight, self.cursor
        # a whole-run view changes little per record: it is drawn at half the chart rate
        self.charts.interval = self._chart_interval * (self._whole_run_slower if self.zoom is None else 1)
        self.charts.soon()

    watch_smooth = watch_time_axis = watch_zoom = watch_around_step = _view_changed
    watch_ema_weight = watch_cursor = _view_changed

    # -- layout: from the terminal's size (layout.py) ------------------------------------------

    def get_default_screen(self) -> Screen:
        return _MainScreen(id="_default")

    def _apply_layout(self) -> None:
        if not hasattr(self, "w_tiles") or not self.is_mounted(self.w_header):
            return
        lay = layout_for(*self.size)
        for cls, on in screen_classes(lay, self.panels_shown, self.detail_shown).items():
            self.w_header.screen.set_class(on, cls)
        self.w_header.screen.set_class(self.comparison.active, "-comparing")
        if lay.tiny:
            self.w_too_small.show(*self.size)
        self.layout_name = lay.name
        self._page_tiles()

    def _page_tiles(self) -> None:
        shown, note = tiles_shown(len(self.w_tiles), self.selected, layout_for(*self.size).short, GRID_COLS)
        if shown != [t.display for t in self.w_tiles]:
            for tile, on in zip(self.w_tiles, shown):
                tile.display = on
            self.charts.soon()  # hidden tiles are not drawn: the ones shown now are behind
        if self.w_detail.border_subtitle != note:  # setting it repaints the border, even unchanged
            self.w_detail.border_subtitle = note

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_alerts(self) -> None:
        m = self.model
        if self.comparison.active:  # every run's alerts, by step, each named by its run's letter
            rows = sorted(
                (
                    (AlertListScreen.step_of(ev, a), ev, a, r)
                    for r in self.comparison.runs
                    for ev, a in r.model.alert_history
                ),
                key=lambda row: row[0],
            )
            still = {(r.label, a.rule, a.first_step) for r in self.comparison.runs for a in r.model.open_alerts}
            screen = AlertListScreen(
                [(ev, a) for _s, ev, a, _r in rows], m.paths, self.live, still, [r for *_x, r in rows]
            )
            self.push_screen(screen, self.jump_to_alert)
            return
        still_open = {(a.rule, a.first_step) for a in m.open_alerts}
        self.push_screen(AlertListScreen(list(m.alert_history), m.paths, self.live, still_open), self.jump_to_alert)

    def action_samples(self) -> None:
        """What the policy wrote: the run's latest samples (samples.jsonl, read by a thread)."""
        if self.model.paths is not None:
            self.push_screen(SamplesScreen(self.model.paths, live=self.live))

    def jump_to_alert(self, alert: Alert | None) -> None:
        """The detail chart shows the alert's own metric around its first step (the tile that
        tells its story is selected, if one does)."""
        if alert is not None:
            i = self.model.selected_chart(alert)
            if i is not None and self.tile_metrics[i] == CHART_METRICS[i]:
                self.selected = i
            cols = [r.model.store.columns.get(alert.metric) for r in self.comparison.runs]  # A's alone, or each run's
            if any(c is not None and c.present for c in cols):
                self.detail_metric = alert.metric
            self.around_step = alert.first_step

    def action_runs(self) -> None:
        paths = self.model.paths
        runs_dir = self.runs_dir or (paths.root.parent if paths else None)
        if runs_dir is not None:
            self.push_screen(RunPickerScreen(runs_dir, paths.root if paths else None), self._picked)

    def _picked(self, row: RunRow | None) -> None:
        if row is not None:
            if not row.is_latest:
                self.runs_dir = None  # a run chosen by hand is not left when `latest` moves
            self.open_run(row.paths)

    def action_verify(self, check: str) -> None:
        self.w_verify.start(check)

    def action_cancel_verify(self) -> None:
        self.w_verify.cancel()

    # -- quitting: nothing here waits for a reader or a check --------------------------------

    def exit(self, *args, **kw) -> None:
        self.close_compared()
        if self.follower is not None:
            self.follower.close()
        if self._local_box is not None:
            self._local_box.close()
        if hasattr(self, "w_verify"):
            spawn(self.w_verify.cancel, name="verify-cancel")  # it may wait for the check to end
        super().exit(*args, **kw)

    def on_unmount(self) -> None:
        if self.follower is not None:
            self.follower.close()
        if self._local_box is not None:
            self._local_box.close()


class _MainScreen(Screen):
    """The monitor's screen: on a resize the app chooses the layout again (layout.py)."""

    def on_resize(self, event) -> None:
        app = self.app
        if isinstance(app, MonitorApp):
            app.call_after_refresh(app._apply_layout)


def _critical_key(item: tuple[str, Alert]) -> tuple[object, object] | None:
    """(rule, first step) of an alert event that is critical (fired so or escalated to it)."""
    ev, a = item
    if ev in ("alert", "alert_escalated") and a.severity == "critical":
        return (a.rule, a.first_step)
    return None
