"""The monitor's file IO, off the UI thread: opening the target, following a run, loading its
history. Each reader posts typed messages to the app; the app applies them to its `RunModel`.

The readers are daemon threads, not Textual's thread workers: those run in the event loop's
default executor, which is joined when the app's loop ends, so a read that takes 30 s (a
1M-step history) or never returns (a library opening a FIFO) would hold up quitting. A
daemon thread is left behind instead; each one checks its stop event between chunks and
ends by itself. Every message carries the token of the run it was read for: the app drops
the messages of a run it has left.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from textual.message import Message

from protocol.columns import columns_path
from protocol.rundir import RunDirError, RunPaths, resolve_run

from .adapted import AdaptedFeed, AdaptedPaths, adapted_target
from .feed import BATCH_RECORDS, TAIL_BYTES, Batch, RunFeed, load_history, snapshot


def spawn(fn, *args, name: str) -> threading.Thread:
    """Run fn(*args) in a daemon thread (never joined: quitting does not wait for it)."""
    t = threading.Thread(target=fn, args=args, name=f"rlhf-tui-{name}", daemon=True)
    t.start()
    return t


def one_line(e: BaseException) -> str:
    """An exception as the one line a user reads (RunDirError messages are written for that)."""
    if isinstance(e, RunDirError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"cannot read {e.filename or 'the run'}: {e.strerror}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def post(target, msg: Message, stop: threading.Event | None = None) -> bool:
    """Post to the app from a reader thread; with `stop`, wait until the app has applied it
    (back-pressure while a long log is caught up). False once the app is closing."""
    try:
        if not target.post_message(msg):
            return False
    except RuntimeError:  # the event loop has closed
        return False
    if stop is None:
        return True
    while not msg.done.wait(0.05):
        if stop.is_set() or not target.is_running:
            return False
    return True


# -- messages ---------------------------------------------------------------------------


class TargetResolved(Message):
    """The command line's path resolved to a run (and, for a runs dir, the dir to watch)."""

    def __init__(self, paths: RunPaths | None, runs_dir: Path | None, error: str = ""):
        super().__init__()
        self.paths, self.runs_dir, self.error = paths, runs_dir, error


class FeedMessage(Message):
    def __init__(self, token: int):
        super().__init__()
        self.token = token


class RecordsRead(FeedMessage):
    """A batch from the feed; the reader waits for `done` before it reads more."""

    def __init__(self, token: int, batch: Batch):
        super().__init__(token)
        self.batch = batch
        self.done = threading.Event()


class HistoryProgress(FeedMessage):
    """How far the history load is; a newer one replaces one not yet handled."""

    def __init__(self, token: int, frac: float):
        super().__init__(token)
        self.frac = frac

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, HistoryProgress)


class HistoryLoaded(FeedMessage):
    """`load_history`'s result (None: the tail was the whole log). `tail`: the alerts of the
    records shown before it, evaluated again after the history (they replace the ones shown),
    and what is open now; None when there was nothing to evaluate again."""

    def __init__(self, token: int, result: tuple | None, tail: Batch | None = None):
        super().__init__(token)
        self.result, self.tail = result, tail


class CaughtUp(FeedMessage):
    """The run's file as it was when it opened is read (and its alerts evaluated): what comes
    after is live (a new critical alert rings the bell; the history loaded at start does not)."""


class LatestMoved(FeedMessage):
    def __init__(self, token: int, paths: RunPaths):
        super().__init__(token)
        self.paths = paths


class FeedFailed(FeedMessage):
    """The reader stopped on something it could not handle (one line)."""

    def __init__(self, token: int, text: str):
        super().__init__(token)
        self.text = text


# -- readers ----------------------------------------------------------------------------


def runs_dir_of(target: Path) -> Path | None:
    """A runs dir given on the command line (or its `latest`) is followed as `latest` moves."""
    if target.name == "latest":
        return target.parent
    if target.is_dir() and not (target / "run.json").exists():
        return target
    return None


def resolve(target: Path) -> tuple[RunPaths, Path | None]:
    """The run a target names (a kit run, or another framework's: AdaptedPaths) and the runs
    dir to follow as its `latest` moves; RunDirError (one line) when there is none."""
    try:
        paths = RunPaths(resolve_run(target).root.resolve())  # `latest` -> the run's real name
        return paths, runs_dir_of(target)
    except RunDirError as e:  # not a kit run: another framework's run (adapters), or this line
        from adapters.sources import SourceError, not_recognised

        try:
            adapted = adapted_target(target) if Path(target).exists() else None
        except SourceError as se:  # a mapping file that is there but wrong
            raise RunDirError(str(se)) from None
        if adapted is None:
            raise RunDirError(not_recognised(target) if Path(target).exists() else str(e)) from None
        return adapted, None


def resolve_target(app, target: Path) -> None:
    try:
        msg = TargetResolved(*resolve(target))
    except Exception as e:  # RunDirError, PermissionError, ...: the app exits with this one line
        msg = TargetResolved(None, None, one_line(e))
    post(app, msg)


def read_gap(app) -> float:
    """Seconds between two live reads: the app's value frame interval (`--fps`), at most 0.5 s."""
    values = getattr(app, "values", None)
    return min(0.5, getattr(values, "interval", 0.0) or 0.0)


# a live read of up to this many records (~65 us each) is evaluated before it is posted: one
# message with the records and their alerts, one value frame for both (the alerts a frame
# later would draw the values twice and put the frames out of step with the reads)
LIVE_EVALUATED_WITH = 256


def with_alerts(batch: Batch, evaluated: Batch) -> None:
    """`batch` takes the alerts `feed.evaluate` gave for its records (`apply_batch` applies both)."""
    batch.alerts = evaluated.alerts
    batch.open_alerts = evaluated.open_alerts
    batch.evaluated_step = evaluated.evaluated_step


def next_frame_at(app) -> float:
    """When the app's next value frame may be drawn (monotonic): a read before that would wait
    for it on screen. A float read from another thread: a stale one costs one frame at most."""
    values = getattr(app, "values", None)
    try:
        return min(values.last + values.interval, time.monotonic() + 0.5)
    except (AttributeError, TypeError):
        return 0.0


# a side file up to this size (~200k steps) is loaded whole before the first screen
WHOLE_FIRST_BYTES = 64 << 20


class RunFollower:
    """Reads one run: its tail first, then live as it grows (watchfiles, or a 1 s poll), its older
    history beside that; with `runs_dir`, notices when `latest` moves to another run."""

    def __init__(
        self, app, paths: RunPaths, token: int, runs_dir: Path | None, tail_bytes: int = TAIL_BYTES, live: bool = True
    ):
        self.app, self.paths, self.token = app, paths, token
        self.runs_dir, self.tail_bytes, self.live = runs_dir, tail_bytes, live
        self.stop = threading.Event()
        self.first_screen = threading.Event()  # the app drew the tail: the history may load
        self.tail_records = 0
        # held by the feed for each batch it reads and posts, and by the history's hand-over:
        # the tail's alerts evaluated again are posted between two batches, never inside one
        self.alerts_lock = threading.Lock()

    def start(self) -> RunFollower:
        spawn(self._guarded, self._follow, name="feed")
        return self

    def close(self) -> None:
        self.stop.set()

    def _guarded(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # a reader never takes the app down: it says what stopped it
            if not self.stop.is_set():
                post(self.app, FeedFailed(self.token, "stopped reading: " + one_line(e)))

    def _send(self, batch: Batch) -> bool:
        return post(self.app, RecordsRead(self.token, batch), self.stop)

    def _follow(self) -> None:
        history_started = False
        if isinstance(self.paths, AdaptedPaths):
            feed = AdaptedFeed(self.paths)
        else:
            whole = self._whole_history_first()
            history_started = whole is not None
            if whole is None:
                feed = RunFeed(self.paths, tail_bytes=self.tail_bytes)
            else:  # on from where the history ended, its records and its alerts'
                feed = RunFeed(self.paths, tail_bytes=self.tail_bytes, start_offset=whole[4], engine=whole[2])

        live = False  # caught up: what is read from here on is a few new records at a time

        def read_one_batch() -> bool | None:
            """Read, post and evaluate one batch: False when the app is closing, True when caught up."""
            nonlocal history_started
            batch = feed.poll()
            if batch.cols:
                self.tail_records += len(batch.cols["step"])
            if not history_started and feed.first_offset is not None and feed.first_offset > 0:
                history_started = True  # before the tail is shown: it may load at once (_history)
                spawn(self._guarded, lambda: self._history(feed, feed.first_offset), name="history")
            if live and 0 < len(batch.pending) <= LIVE_EVALUATED_WITH:
                with_alerts(batch, feed.evaluate(batch))
            if not batch.empty and not self._send(batch):
                return False
            if batch.pending and not self._send(feed.evaluate(batch)):
                return False
            if not history_started and feed.first_offset is not None:
                history_started = True
                post(self.app, HistoryLoaded(self.token, None))
            if not batch.cols or len(batch.cols["step"]) + batch.cols["skipped"] < BATCH_RECORDS:
                return True  # caught up
            return None

        def drain() -> bool:
            while not self.stop.is_set():
                with self.alerts_lock:
                    done = read_one_batch()
                if done is not None:
                    return done
            return False

        if not drain() or not self.live:
            return
        post(self.app, CaughtUp(self.token))  # from here on, what arrives is new (the bell)
        live = True
        # at most one read per value frame: a run writing 10 records/s is read 5 times a second
        # at --fps 5 (each read takes what came since the last), not once per record; the first
        # record after a quiet spell is read at once
        gap = read_gap(self.app)
        last_read = -1e9
        for _ in self._wake_ups():
            wait = max(last_read + gap, next_frame_at(self.app)) - time.monotonic()
            if wait > 0 and self.stop.wait(wait):
                return
            last_read = time.monotonic()
            if not self.app.is_running or not drain():
                return
            if self.runs_dir is not None:
                moved = self._latest_moved()
                if moved is not None:
                    post(self.app, LatestMoved(self.token, moved))
                    return

    def _whole_history_first(self) -> tuple | None:
        """A big log with a side file of up to WHOLE_FIRST_BYTES: the whole history is shown first
        (array work, well under a second), then the run is followed from where it ended. Returns
        `load_history`'s result, or None (the tail first, the history beside it)."""
        try:
            size = os.path.getsize(self.paths.steps)
            cols = os.path.getsize(columns_path(self.paths.steps))
        except OSError:
            return None
        if size <= self.tail_bytes or cols > WHOLE_FIRST_BYTES:
            return None
        result = None
        for item in load_history(self.paths, size, self.stop.is_set):
            if not isinstance(item, float):
                result = item
        if result is None:
            return None
        engine = result[2]
        nothing_after = Batch(alerts_only=True, open_alerts=[snapshot(a) for a in engine.open.values()])
        nothing_after.evaluated_step = result[0].last_step  # the history's alerts are evaluated to its end
        if not post(self.app, HistoryLoaded(self.token, result, nothing_after)):
            return None
        return result

    def _history(self, feed: RunFeed, end_offset: int) -> None:
        """Load the records before the tail: at once from a columnar side file (array work, a
        fraction of a second), else after the tail's first screen (decoding holds the GIL). The
        feed then goes on from the history's alert engine, its tail's alerts evaluated again."""
        try:
            if not os.path.exists(columns_path(self.paths.steps)):
                while not self.first_screen.wait(0.05):
                    if self.stop.is_set():
                        return
            last_report = 0.0
            for item in load_history(self.paths, end_offset, self.stop.is_set):
                if isinstance(item, float):
                    if time.monotonic() - last_report > 0.5:
                        last_report = time.monotonic()
                        post(self.app, HistoryProgress(self.token, item))
                elif not self.stop.is_set():
                    with self.alerts_lock:
                        tail = feed.adopt_history(item[2])
                        post(self.app, HistoryLoaded(self.token, item, tail))
        finally:
            with self.alerts_lock:
                feed.no_history_coming()  # a no-op once adopted; else the tail's records are not kept

    def _wake_ups(self):
        """Yield when the run dir changed (watchfiles), or every second anyway: a slow poll
        covers file systems that send no notifications (NFS) and the `latest` link."""
        root, recursive = self.paths.root, False
        if isinstance(self.paths, AdaptedPaths):  # a file (veRL's JSONL) or a tree (TensorBoard)
            recursive = root.is_dir()
            root = root if recursive else root.parent
        try:
            from watchfiles import watch

            for _changes in watch(
                root,
                stop_event=self.stop,
                debounce=20,
                step=10,
                rust_timeout=1000,
                yield_on_timeout=True,
                recursive=recursive,
                raise_interrupt=False,
            ):
                yield
            return
        except Exception:  # no inotify (limits, exotic FS): poll instead
            pass
        while not self.stop.wait(1.0):
            yield

    def _latest_moved(self) -> RunPaths | None:
        latest = self.runs_dir / "latest"
        try:
            now = latest.resolve(strict=True)
            if (now / "run.json").exists() and now != self.paths.root.resolve():
                return RunPaths(now)
        except OSError:
            pass
        return None
