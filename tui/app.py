"""`MonitorApp`: wires the run feed (workers) to the widgets and keys."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer

from protocol.alerts import Alert, most_severe
from protocol.rundir import RunDirError, RunPaths, resolve_run

from .feed import TAIL_BYTES, Batch, RunFeed, load_history
from .screens import AlertListScreen, HelpScreen, RunPickerScreen
from .store import CHART_METRICS, RunStore
from .widgets.charts import ZOOM_STEPS, ChartView, DetailChart, MetricTile
from .widgets.panels import AlertBanner, EventsPanel, HeaderInfo, ProfilerPanel, RunHeader
from .widgets.verify import VerifyPanel

GRID_COLS = 3
CHART_FPS = 1.0
# An alert on a metric without its own chart jumps to the chart that tells its story.
CHART_OF = {
    "kl_target_error": "kl",
    "explained_variance": "value_loss",
    "reward_std": "reward_mean",
    "policy_loss": "grad_norm",
    "approx_kl": "clip_frac",
    "gold_reward_mean": "reward_mean",
}


class MonitorApp(App):
    CSS_PATH = Path(__file__).with_name("monitor.tcss")
    TITLE = "rlhf-tui"
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "keys"),
        Binding("a", "alerts", "alerts"),
        Binding("r", "runs", "runs"),
        Binding("left,h", "move(-1)", "", show=False),
        Binding("right,l", "move(1)", "", show=False),
        Binding("up,k", f"move({-GRID_COLS})", "", show=False),
        Binding("down,j", f"move({GRID_COLS})", "", show=False),
        Binding("s", "smooth", "EMA"),
        Binding("t", "time_axis", "x axis"),
        Binding("z", "zoom", "zoom"),
        Binding("f", "follow", "follow"),
        Binding("1", "verify('m1')", "M1"),
        Binding("2", "verify('m2')", "M2"),
        Binding("3", "verify('m3')", "M3"),
        Binding("x", "cancel_verify", "cancel", show=False),
    ]

    def __init__(
        self,
        target: str | os.PathLike,
        fps: float = 5.0,
        stall_after: float = 60.0,
        chart_fps: float | None = None,
        clock: Callable[[], float] = time.time,
        tail_bytes: int = TAIL_BYTES,
        live: bool = True,
    ):
        super().__init__()
        self.target = Path(target)
        self.fps = max(0.2, fps)
        # charts redraw slower than the values: by default 1 a second (or `fps` if lower)
        self.chart_fps = min(self.fps, max(0.2, chart_fps if chart_fps is not None else CHART_FPS))
        self.stall_after = stall_after
        self.clock = clock  # injected so snapshots are deterministic
        self.tail_bytes = tail_bytes
        self.live = live  # False: read what is there once, no watcher (snapshots)
        self.store = RunStore()
        self.view = ChartView()
        self.paths: RunPaths | None = None
        self.runs_dir: Path | None = self._runs_dir_of(self.target)
        self.open_alerts: list[Alert] = []
        self.alert_history: list[tuple[str, Alert]] = []
        self.events: list[dict] = []
        self.manifest: dict = {}
        self.status = "…"
        self.corrupt = 0
        self.history_corrupt = 0
        self.loading = ""
        self.selected = 0
        self.last_arrival: float | None = None  # wall clock of the last batch with records
        self.drawn_step: int | None = None  # last step drawn on screen, and when (benchmarks)
        self.drawn_at = 0.0
        self.first_full_screen_at: float | None = None
        self.history_done = False  # the whole log is in the store (benchmarks, tests)
        self.alerts_step = None  # the last step the live alert engine has evaluated
        self._feed_token = 0
        self._feed_stop = threading.Event()
        self._redraw_timer = None
        self._last_draw = 0.0
        self._dirty: set[str] = set()
        self._charts_pending = False
        self._last_chart = 0.0
        self._chart_timer = None
        self.chart_step: int | None = None  # last step the charts drew (tests, benchmarks)

    @staticmethod
    def _runs_dir_of(target: Path) -> Path | None:
        """A runs dir given on the command line (or its `latest`) is followed as `latest` moves."""
        if target.name == "latest":
            return target.parent
        if target.is_dir() and not (target / "run.json").exists():
            return target
        return None

    # -- layout -----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield AlertBanner(id="banner")
        with Horizontal(id="body"):
            with Vertical(id="left"):
                with Grid(id="grid"):
                    for _i, m in enumerate(CHART_METRICS):
                        yield MetricTile(m, id=f"tile-{m}", classes="tile")
                yield DetailChart(id="detail")
            with Vertical(id="right"):
                yield ProfilerPanel(id="profiler")
                yield VerifyPanel(id="verify")
                yield EventsPanel(id="events")
        yield Footer()

    def on_mount(self) -> None:
        self.main_screen = self.screen  # widgets are looked up here even while a dialog is on top
        # looked up once: a DOM query per frame costs more than drawing the values
        self.w_tiles = list(self.query(MetricTile))
        self.w_detail = self.query_one(DetailChart)
        self.w_header = self.query_one(RunHeader)
        self.w_banner = self.query_one(AlertBanner)
        self.w_events = self.query_one(EventsPanel)
        self.w_profiler = self.query_one(ProfilerPanel)
        self.query_one("#profiler").border_title = "where the time goes"
        self.query_one("#verify").border_title = "checks"
        self.query_one("#events").border_title = "events"
        self._select(0)
        try:
            paths = RunPaths(resolve_run(self.target).root.resolve())  # `latest` -> the run's real name
        except RunDirError as e:
            self.exit(return_code=2, message=str(e))
            return
        self.open_run(paths)
        self.set_interval(1.0, self._tick)

    # -- the run feed -----------------------------------------------------------------

    def open_run(self, paths: RunPaths) -> None:
        self._feed_stop.set()  # the old feed thread ends at its next wake-up
        self._feed_stop = threading.Event()
        self._feed_token += 1
        self.paths = paths
        self.store.clear()
        self.view = ChartView(smooth=self.view.smooth, time_axis=self.view.time_axis, zoom=self.view.zoom)
        self.open_alerts, self.alert_history, self.events = [], [], []
        self.manifest, self.status, self.corrupt, self.history_corrupt = {}, "…", 0, 0
        self.loading, self.last_arrival, self.history_done = "", None, False
        self.alerts_step = None
        self.main_screen.query_one(VerifyPanel).run_dir = paths.root
        self._dirty = {"all"}
        self.chart_step = None
        self.follow_run(paths, self._feed_token, self._feed_stop)
        self._schedule_redraw()

    @work(thread=True, group="feed")
    def follow_run(self, paths: RunPaths, token: int, stop: threading.Event) -> None:
        feed = RunFeed(paths, tail_bytes=self.tail_bytes)
        history_started = False

        def drain() -> None:
            nonlocal history_started
            while not stop.is_set():
                batch = feed.poll()
                if not batch.empty and not self._post(self.apply_batch, batch, token):
                    return
                if batch.pending and not self._post(self.apply_batch, feed.evaluate(batch), token):
                    return
                if not history_started and feed.first_offset is not None:
                    history_started = True
                    if feed.first_offset > 0:
                        self._post(self.start_history, paths, feed.first_offset, token)
                    else:
                        self._post(setattr, self, "history_done", True)
                if not batch.cols or len(batch.cols["step"]) < 5000:
                    return  # caught up

        drain()
        if not self.live:
            return
        for _ in self._wake_ups(paths, stop):
            if not self.is_running:
                stop.set()  # the app is closing: end here, or interpreter shutdown waits on us
                return
            drain()
            if self.runs_dir is not None:
                moved = self._latest_moved(paths)
                if moved is not None:
                    self._post(self.switch_run, moved, token)
                    return

    def _wake_ups(self, paths: RunPaths, stop: threading.Event):
        """Yield when the run dir changed (watchfiles), or every second anyway: a slow poll
        covers file systems that send no notifications (NFS) and the `latest` link."""
        try:
            from watchfiles import watch

            for _changes in watch(
                paths.root,
                stop_event=stop,
                debounce=20,
                step=10,
                rust_timeout=1000,
                yield_on_timeout=True,
                recursive=False,
                raise_interrupt=False,
            ):
                yield
            return
        except Exception:  # no inotify (limits, exotic FS): poll instead
            pass
        while not stop.wait(1.0):
            yield

    def _latest_moved(self, paths: RunPaths) -> RunPaths | None:
        latest = self.runs_dir / "latest"
        try:
            now = latest.resolve(strict=True)
        except OSError:
            return None
        if (now / "run.json").exists() and now != paths.root.resolve():
            return RunPaths(now)
        return None

    class FromWorker(Message):
        """A call a worker thread hands to the UI thread (`post_message` is thread-safe)."""

        def __init__(self, fn, args: tuple):
            super().__init__()
            self.fn, self.args, self.done = fn, args, threading.Event()

    def on_monitor_app_from_worker(self, msg: MonitorApp.FromWorker) -> None:
        try:
            msg.fn(*msg.args)
        finally:
            msg.done.set()

    def _post(self, fn, *args) -> bool:
        """Run fn on the UI thread and wait for it (back-pressure for the readers); False once
        the app is closing. Unlike call_from_thread this never blocks on a loop that has ended."""
        msg = self.FromWorker(fn, args)
        if not self.post_message(msg):
            return False
        while not msg.done.wait(0.25):
            if self._feed_stop.is_set() or not self.is_running:
                return False
        return True

    def switch_run(self, paths: RunPaths, token: int) -> None:
        if token == self._feed_token:
            self.notify(f"latest moved: now following {paths.run_id}")
            self.open_run(paths)

    def apply_batch(self, batch: Batch, token: int) -> None:
        if token != self._feed_token:
            return  # a batch from a run we have left
        if batch.reset:
            self.store.clear()
            self.alert_history = []
            self.view.around_step = None
            self._dirty.add("all")
        if batch.cols and batch.cols["step"]:
            self.store.extend(batch.cols)
            self.last_arrival = self.clock()
            self._dirty.add("data")
        if batch.alerts:
            self.alert_history.extend(batch.alerts)
        if [a.rule for a in batch.open_alerts] != [a.rule for a in self.open_alerts] or batch.alerts:
            self._dirty.add("alerts")
        self.open_alerts = batch.open_alerts
        if batch.evaluated_step is not None:
            self.alerts_step = batch.evaluated_step
        if batch.alerts_only:
            if self._dirty:
                self._schedule_redraw()
            return
        if batch.events:
            self.events.extend(batch.events)
            del self.events[:-500]
            self._dirty.add("events")
        if batch.manifest is not None:
            self.manifest = batch.manifest
            self._dirty.add("header")
        if batch.status is not None:
            self.status = batch.status
            self._dirty.add("header")
        if batch.corrupt_frames + self.history_corrupt != self.corrupt:
            self.corrupt = batch.corrupt_frames + self.history_corrupt
            self._dirty.add("alerts")
        if self._dirty:
            self._schedule_redraw()

    @work(thread=True, group="history")
    def start_history(self, paths: RunPaths, end_offset: int, token: int) -> None:
        """Load the records before the tail, then put them in front of it."""
        while self.first_full_screen_at is None and token == self._feed_token and self.is_running:
            time.sleep(0.01)  # the tail's first screen goes first: the GIL is shared
        per_record = self.tail_bytes / max(1, len(self.store))
        last_report = 0.0
        result = None
        for item in load_history(paths, end_offset, lambda: token != self._feed_token, per_record):
            if isinstance(item, float):
                if time.monotonic() - last_report > 0.5:
                    last_report = time.monotonic()
                    self._post(self._history_progress, item, token)
            else:
                result = item
        if result is not None and token == self._feed_token:
            self._post(self.apply_history, result, token)

    def _history_progress(self, frac: float, token: int) -> None:
        if token == self._feed_token:
            self.loading = f"loading history {frac:.0%}"
            self._dirty.add("header")
            self._schedule_redraw()

    def apply_history(self, result, token: int) -> None:
        if token != self._feed_token:
            return
        older, alerts, _open_at_end, corrupt = result
        self.store.prepend(older)
        self.alert_history[:0] = alerts
        self.history_corrupt = corrupt
        self.corrupt += corrupt
        self.loading = ""
        self.history_done = True
        self._dirty.update({"data", "alerts"})
        self._schedule_redraw()

    # -- drawing ------------------------------------------------------------------------

    def _schedule_redraw(self) -> None:
        """Coalesce: at most `fps` redraws a second; the first change after a quiet spell draws at once."""
        if self._redraw_timer is not None:
            return
        delay = self._last_draw + 1.0 / self.fps - time.monotonic()
        if delay > 0.001:
            self._redraw_timer = self.set_timer(delay, self._redraw)
        else:
            self._redraw_timer = True
            self.call_later(self._redraw)

    def _tick(self) -> None:
        """Once a second: ages, elapsed time, stalled status. Only the header line is redrawn,
        and outside the frame budget, so a tick never delays new data."""
        if self._redraw_timer is None:
            self.w_header.show(self.header_info())

    def _redraw(self) -> None:
        """One frame: the header and the tiles' value lines (at most `fps` a second, only what
        changed), and the charts, profiler included, at most `chart_fps` a second: a chart frame
        costs ~10x a value frame. A key that changes the view draws the charts at once."""
        self._redraw_timer = None
        now = time.monotonic()
        self._last_draw = now
        dirty, self._dirty = self._dirty, set()
        everything = "all" in dirty
        if everything or dirty & {"data", "alerts", "view"}:
            self._charts_pending = True
        urgent = everything or "view" in dirty or self.chart_step is None  # the first data draws at once
        for tile in self.w_tiles:
            tile.refresh_value()
        if self._charts_pending:
            if urgent or now - self._last_chart >= 1.0 / self.chart_fps:
                self._draw_charts(now)
            elif self._chart_timer is None:
                self._chart_timer = self.set_timer(self._last_chart + 1.0 / self.chart_fps - now, self._charts_due)
        if everything or "alerts" in dirty:
            self.w_banner.show(self.most_severe(), len(self.open_alerts), self.corrupt)
        if everything or "events" in dirty:
            ev = self.w_events
            ev.show(self.events, ev.content_size.height or 10, self.manifest.get("started_at"))
        self.w_header.show(self.header_info())
        self.drawn_step = self.store.last_step
        self.drawn_at = time.monotonic()
        if self.first_full_screen_at is None and len(self.store) and self.chart_step == self.drawn_step:
            self.first_full_screen_at = self.drawn_at

    def _charts_due(self) -> None:
        self._chart_timer = None
        self._schedule_redraw()

    def _draw_charts(self, now: float) -> None:
        self._charts_pending = False
        self._last_chart = now
        if self._chart_timer is not None:
            self._chart_timer.stop()
            self._chart_timer = None
        self._update_alert_marks()
        for tile in self.w_tiles:
            tile.redraw_chart()
        self.w_detail.redraw_chart()
        prof = self.w_profiler
        prof.show(self.store, prof.content_size.width)
        self.chart_step = self.store.last_step

    def most_severe(self) -> Alert | None:
        return most_severe(self.open_alerts)

    def _update_alert_marks(self) -> None:
        metric = CHART_METRICS[self.selected]
        self.view.alert_marks = [
            (a.first_step, a.severity)
            for ev, a in self.alert_history
            if ev == "alert" and CHART_OF.get(a.metric, a.metric) == metric
        ]

    def header_info(self) -> HeaderInfo:
        m, s = self.manifest, self.store
        now = self.clock()
        last_time = s.times[-1] if len(s) and math.isfinite(s.times[-1]) else self.last_arrival
        age = now - last_time if last_time is not None else None
        status = self.status
        if status == "running" and age is not None and age > self.stall_after:
            status = "stalled"
        started, ended = m.get("started_at"), m.get("ended_at")
        elapsed = None
        if isinstance(started, (int, float)):
            elapsed = (ended if isinstance(ended, (int, float)) else now) - started
        cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
        total = cfg.get("steps") if isinstance(cfg.get("steps"), int) else None
        return HeaderInfo(
            run_id=self.paths.run_id if self.paths else "—",
            status=status,
            step=s.last_step,
            total_steps=total,
            steps_per_s=s.steps_per_second(),
            elapsed_s=elapsed,
            age_s=age,
            corrupt=self.corrupt,
            loading=self.loading,
        )

    # -- keys -----------------------------------------------------------------------------

    def _select(self, i: int) -> None:
        self.selected = i % len(CHART_METRICS)
        for k, tile in enumerate(self.w_tiles):
            tile.selected = k == self.selected
        self.w_detail.metric = CHART_METRICS[self.selected]
        self._dirty.add("view")
        self._schedule_redraw()

    def action_move(self, delta: int) -> None:
        self._select(self.selected + delta)

    def action_smooth(self) -> None:
        self.view.smooth = not self.view.smooth
        self._view_changed()

    def action_time_axis(self) -> None:
        self.view.time_axis = not self.view.time_axis
        self._view_changed()

    def action_zoom(self) -> None:
        i = ZOOM_STEPS.index(self.view.zoom) if self.view.zoom in ZOOM_STEPS else 0
        self.view.zoom = ZOOM_STEPS[(i + 1) % len(ZOOM_STEPS)]
        self._view_changed()

    def action_follow(self) -> None:
        self.view.around_step = None
        self._view_changed()

    def _view_changed(self) -> None:
        self._dirty.add("view")
        self._schedule_redraw()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_alerts(self) -> None:
        self.push_screen(
            AlertListScreen(list(self.alert_history), {a.rule for a in self.open_alerts}), self.jump_to_alert
        )

    def jump_to_alert(self, alert: Alert | None) -> None:
        if alert is None:
            return
        metric = CHART_OF.get(alert.metric, alert.metric)
        if metric in CHART_METRICS:
            self._select(CHART_METRICS.index(metric))
        self.view.around_step = alert.first_step
        self._view_changed()

    def action_runs(self) -> None:
        runs_dir = self.runs_dir or (self.paths.root.parent if self.paths else None)
        if runs_dir is None:
            return
        self.push_screen(RunPickerScreen(runs_dir, self.paths.root if self.paths else None), self._picked)

    def _picked(self, paths: RunPaths | None) -> None:
        if paths is not None:
            if self.runs_dir is not None and (self.runs_dir / "latest").resolve() != paths.root.resolve():
                self.runs_dir = None  # a run chosen by hand is not left when `latest` moves
            self.open_run(paths)

    def action_verify(self, check: str) -> None:
        self.main_screen.query_one(VerifyPanel).start(check)

    def action_cancel_verify(self) -> None:
        self.main_screen.query_one(VerifyPanel).cancel()

    def exit(self, *args, **kw) -> None:
        self._feed_stop.set()  # feed threads end at their next wake-up (<= 1 s)
        try:
            self.main_screen.query_one(VerifyPanel).cancel()
        except Exception:
            pass
        super().exit(*args, **kw)

    def on_unmount(self) -> None:
        self._feed_stop.set()
