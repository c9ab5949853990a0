"""The monitor's compared runs: opening, following and closing the runs drawn over the first.

`rlhf-tui A B C` (or the run picker's space key) adds runs to the app's `Comparison`
(tui/overlay.py). Each compared run has its own RunModel and RunFollower, whose messages carry
the run's own token: the app hands them here when they are not its own run's. A compared run
is read exactly as the first one (tail, history, live, alerts by its own rules); only the
first run has the banner's advice, the checks, the samples and the box.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from textual.message import Message

from protocol.rundir import RunPaths
from protocol.text import safe_text

from .follow import (
    CaughtUp,
    FeedFailed,
    FeedMessage,
    HistoryLoaded,
    HistoryProgress,
    RecordsRead,
    RunFollower,
    one_line,
    post,
    resolve,
    spawn,
)
from .model import RunModel
from .overlay import MAX_RUNS, ComparedRun, Comparison

TOKENS = itertools.count(1)  # every open of every run gets its own: messages are never mixed up


class CompareResolved(Message):
    def __init__(self, run: ComparedRun, paths: RunPaths | None, error: str = ""):
        super().__init__()
        self.run, self.paths, self.error = run, paths, error


class ComparingMixin:
    """What MonitorApp does for its compared runs (it sets `comparison`, `model`, `clock`...)."""

    comparison: Comparison

    def add_compare(self, target: str | Path, remote=None) -> str:
        """Start comparing the run at `target` (a resolved local path; `remote`: its RemoteSync);
        returns what happened, in one line."""
        if len(self.comparison.runs) >= MAX_RUNS:
            return f"at most {MAX_RUNS} runs can be compared"
        run = self.comparison.add(RunModel(), str(target))
        assert run is not None
        run.model.acked = self.model.acked  # one user's acknowledgements, whatever the run
        run.remote = remote
        run.token = next(TOKENS)
        if remote is not None:  # "link ... down since ...", in the legend

            def on_link(text: str) -> None:
                try:
                    self.call_from_thread(self._compared_link, run, text)
                except Exception:  # the app is not running (yet, or any more)
                    run.model.link = text

            remote.on_link = on_link
        spawn(self._resolve_compared, run, Path(target), name="open-compared")
        self._compare_layout()
        return f"comparing {safe_text(str(target), 80)} as {run.label}"

    def _resolve_compared(self, run: ComparedRun, target: Path) -> None:
        try:
            paths, _runs_dir = resolve(target)  # a runs dir: its latest run (not followed as it moves)
            msg = CompareResolved(run, paths)
        except Exception as e:
            msg = CompareResolved(run, None, one_line(e))
        post(self, msg)

    def on_compare_resolved(self, msg: CompareResolved) -> None:
        run = msg.run
        if run not in self.comparison.runs:
            return  # removed meanwhile
        if msg.paths is None:
            run.model.fail(msg.error)
            self._changed({"alerts"})
            return
        if run.remote is not None:
            run.remote.follow(Path(msg.paths.root))
        run.model.reset(msg.paths)
        run.follower = RunFollower(self, msg.paths, run.token, None, self.tail_bytes, self.live)
        run.follower.first_screen.set()  # the first run's screen is up: its history may load at once
        run.follower.start()
        self._changed({"all"})

    def _compared_link(self, run: ComparedRun, text: str) -> None:
        run.model.link = text
        self._changed({"alerts"})

    def toggle_compare(self, paths: RunPaths) -> str:
        """The run picker's space: compare this run, or stop comparing it."""
        first = self.model.paths
        if first is not None and Path(first.root).resolve() == Path(paths.root).resolve():
            return "that is run A, the one on screen"
        run = self.comparison.by_root(paths.root)
        if run is not None:
            self.remove_compare(run)
            return f"stopped comparing {safe_text(run.name, 80)} ({run.label})"
        remote = getattr(self, "remote", None)
        if remote is not None and Path(paths.root).resolve().is_relative_to(Path(remote.mirror).resolve()):
            # the ssh session streams the run on screen only: another remote run needs its own
            url = f"{remote.target.display.rstrip('/')}/{paths.root.name}"
            return f"another remote run is compared from the command line: rlhf-tui ... {safe_text(url, 200)}"
        return self.add_compare(paths.root)

    def remove_compare(self, run: ComparedRun) -> None:
        if run.follower is not None:
            run.follower.close()
        if run.remote is not None:
            run.remote.close()
        self.comparison.remove(run)
        self._compare_layout()
        self._changed({"all"})

    def compared_message(self, msg: FeedMessage) -> bool:
        """Apply a compared run's reader message; False if it is no compared run's."""
        run = self.comparison.by_token(msg.token)
        if run is None:
            return False
        m = run.model
        if isinstance(msg, RecordsRead):
            try:
                first = not len(m.store)
                changed = m.apply_batch(msg.batch, self.clock())
            finally:
                msg.done.set()
            if first and len(m.store):
                self._panel_drawn_at = -1e9  # its column of the profiler: at the next chart frame
            self._changed(changed - {"events"})
        elif isinstance(msg, HistoryLoaded):
            if msg.result is None:
                m.history_done = True
            else:
                self._panel_drawn_at = -1e9
                self._changed(m.apply_history(msg.result, msg.tail) - {"events"})
        elif isinstance(msg, HistoryProgress):
            m.loading = f"loading history {msg.frac:.0%}"
            self.values.request()
        elif isinstance(msg, FeedFailed):
            m.fail(msg.text)
            self._changed({"alerts"})
        elif isinstance(msg, CaughtUp):
            pass
        return True

    def close_compared(self) -> None:
        for run in self.comparison.runs[1:]:
            if run.follower is not None:
                run.follower.close()
            if run.remote is not None:
                run.remote.close()

    def compare_rows(self, now: float, stall_after: float) -> list:
        """(run, header info) of every run, for the legend and the banner."""
        return [(r, r.model.header_info(now, stall_after)) for r in self.comparison.runs]

    def cycle_x_axis(self) -> str:
        from .overlay import AXES

        axis = self.view.x_axis
        return AXES[(AXES.index(axis) + 1) % len(AXES)] if axis in AXES else AXES[0]
