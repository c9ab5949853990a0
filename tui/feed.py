"""Reading a run directory as it grows, through `protocol` only (no UI here).

`RunFeed.poll()` returns a `Batch` of what arrived since the last call: new step
records (already columnized), the alerts the live `AlertEngine` raised or cleared on
them, new events, the manifest when it changed, corruption counts, and a one-line
`problem` when a run file cannot be read. A huge log is read tail first
(`StepLogTailer(start_offset=...)`) and its older history by `load_history` in the
background. The live engine starts fresh at the tail, so its verdicts there are provisional
(a streak that began in the history is cut, a rolling median is empty): once the history's
alerts are known, `adopt_history` evaluates the tail's records again from the history's end
state and the live engine goes on from there. Files are opened by `protocol` only; a run
file that is not a regular file (a FIFO, a device) is reported, never opened here.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import stat
import time
from dataclasses import dataclass, field

from protocol.alerts import DEFAULT_RULES, Alert, AlertEngine, load_run_rules
from protocol.jsonl import JsonlTailer
from protocol.rundir import RunDirError, RunPaths, effective_status, read_manifest_checked
from protocol.steplog import StepLogTailer
from protocol.text import safe_text

from .fastload import load_columns
from .history_alerts import evaluate_history
from .store import RunStore, is_placeable

TAIL_BYTES = 4 << 20  # read this much of a big log first (~5k records), the rest in the background
BATCH_RECORDS = 5000  # records per batch applied to the UI
HISTORY_CHUNK = 5000  # records read between checks of should_stop (~30 ms)


@dataclass
class Batch:
    cols: dict | None = None
    alerts: list[tuple[str, Alert]] = field(default_factory=list)
    open_alerts: list[Alert] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    manifest: dict | None = None
    status: str | None = None
    corrupt_frames: int = 0
    skipped_records: int = 0  # records without a step a chart can place (since the feed began)
    problem: str | None = None  # a run file cannot be read (one line), "" when that cleared
    reset: bool = False  # the log shrank or was replaced: forget what was shown
    arrived: float = 0.0  # monotonic time the batch was read (for latency measurements)
    pending: list = field(default_factory=list)  # records whose alerts are not evaluated yet
    alerts_only: bool = False  # carries alerts (and open alerts) only
    evaluated_step: int | None = None  # with alerts_only: the last step the alerts have seen
    rules: tuple | None = None  # the run's alert rules (alerts.json), once, with the first records
    rules_note: str | None = None  # why the defaults are used instead (a damaged alerts.json)

    @property
    def empty(self) -> bool:
        return (
            not (self.cols and (self.cols["step"] or self.cols["skipped"]))
            and not self.alerts
            and not self.events
            and self.manifest is None
            and not self.reset
            and self.problem is None
            and self.rules is None
        )


def snapshot(alert: Alert) -> Alert:
    return dataclasses.replace(alert)


class RunFeed:
    def __init__(
        self,
        paths: RunPaths,
        tail_bytes: int = TAIL_BYTES,
        start_offset: int | None = None,
        engine: AlertEngine | None = None,
    ):
        """`start_offset`: the history before it is already shown (a frame boundary: read from
        there); `engine`: the alert engine as that history left it (the live one goes on from it)."""
        self.paths = paths
        try:
            size = os.path.getsize(paths.steps)
        except OSError:
            size = 0
        self.tail_start = size - tail_bytes if size > tail_bytes else 0
        if start_offset is not None:
            self.tail_start = start_offset
        self.tailer = StepLogTailer(paths.steps, start_offset=self.tail_start, at_frame=start_offset is not None)
        self.events = JsonlTailer(paths.events)
        # the run's own rules (alerts.json), read when its first records arrive: the trainer
        # writes the file just after run.json, before any step
        self.rules: tuple | None = None
        self.engine = copy.deepcopy(engine) if engine is not None else AlertEngine()
        self.seeded = engine is not None  # the engine has the history before start_offset behind it
        # the records a fresh engine evaluated at the tail, kept to be evaluated again once the
        # history's end state is known (adopt_history); None when no history comes before them
        self.unseeded: list[dict] | None = [] if self.tail_start > 0 and not self.seeded else None
        self._resets = 0
        self._manifest_mtime = None
        self._manifest: dict = {}
        self._manifest_read = False  # the last read of run.json worked
        self._status = None
        self._problem = ""
        self._manifest_problem = ""
        self.skipped = 0
        self.first_offset: int | None = start_offset  # where the tail's first frame starts

    def poll(self, max_records: int = BATCH_RECORDS) -> Batch:
        b = Batch(arrived=time.monotonic())
        if self.first_offset is None:
            before = self.tailer.offset
            recs = self.tailer.poll(max_records)
            if recs:
                # the tailer aligned to a frame boundary; remember it for the history loader
                self.first_offset = self._aligned_start(before, recs)
                if self.first_offset == 0:
                    self.unseeded = None  # the tail is the whole log
        else:
            recs = self.tailer.poll(max_records)
        # a run whose history was read whole first may have no record after it: its rules are
        # known already (the history was evaluated with them)
        if self.rules is None and (recs or self.seeded):
            self.rules, b.rules_note = load_run_rules(self.paths.root)
            b.rules = self.rules
            if not self.seeded:
                self.engine = AlertEngine(self.rules)
        if self.tailer.stats.resets != self._resets:
            self._resets = self.tailer.stats.resets
            self.engine = AlertEngine(self.rules or DEFAULT_RULES)
            self.unseeded = None  # read again from the start: no history comes before it
            self.tail_start = 0
            self.first_offset = 0
            b.reset = True
        if recs:
            b.cols = RunStore.columnize(recs)
            self.skipped += b.cols["skipped"]
            b.pending = [r for r in recs if is_placeable(r)] if b.cols["skipped"] else recs
        b.open_alerts = [snapshot(a) for a in self.engine.open.values()]
        b.events = self.events.poll()
        b.corrupt_frames = self.tailer.stats.corrupt_frames
        b.skipped_records = self.skipped
        self._read_manifest(b)
        problem = self._manifest_problem or self._not_regular()
        if problem != self._problem:
            self._problem = b.problem = problem
        return b

    def _not_regular(self) -> str:
        """A run file that exists but is not a regular file (a FIFO would block a reader)."""
        for p in (self.paths.manifest, self.paths.steps, self.paths.events):
            try:
                mode = os.stat(p).st_mode
            except OSError:
                continue
            if not stat.S_ISREG(mode):
                return f"{p.name} is not a regular file: not read"
        return ""

    def evaluate(self, batch: Batch) -> Batch:
        """The alerts of a batch's records. Kept apart from `poll` so the records can be shown
        first: the engine costs ~65 us a record, too much to hold a first screen back for."""
        out = Batch(arrived=batch.arrived)
        if batch.pending:
            out.evaluated_step = batch.pending[-1].get("step")
        for r in batch.pending:
            out.alerts.extend((ev, snapshot(a)) for ev, a in self.engine.update(r))
        if self.unseeded is not None:
            self.unseeded.extend(batch.pending)
        batch.pending = []
        out.open_alerts = [snapshot(a) for a in self.engine.open.values()]
        out.corrupt_frames = batch.corrupt_frames
        out.alerts_only = True
        return out

    def adopt_history(self, history_engine: AlertEngine) -> Batch | None:
        """Go on from the history's end state: the records evaluated so far by the engine that
        began fresh at the tail are evaluated again after the history. Returns their alerts (they
        replace the ones already given) and what is open, or None when there is nothing to redo
        (no history before the tail, or the log was read again from its start meanwhile)."""
        if self.unseeded is None:
            return None
        engine = copy.deepcopy(history_engine)  # the history's result is not ours to change
        out = Batch(alerts_only=True)
        for r in self.unseeded:
            out.alerts.extend((ev, snapshot(a)) for ev, a in engine.update(r))
        if self.unseeded:
            out.evaluated_step = self.unseeded[-1].get("step")
        out.open_alerts = [snapshot(a) for a in engine.open.values()]
        self.engine, self.seeded, self.unseeded = engine, True, None
        return out

    def no_history_coming(self) -> None:
        """The history will not be handed over (its load stopped or failed): the tail's verdicts
        stay as they are, and its records are no longer kept for evaluating them again."""
        self.unseeded = None

    def _aligned_start(self, before: int, recs: list[dict]) -> int:
        if self.tail_start == 0:
            return 0
        # offset after the batch minus the frames' sizes is the first frame's start; we do not
        # have sizes, so ask the file: scan from tail_start for the first frame with this step
        from protocol.steplog import StepLogTailer as _T

        probe = _T(self.paths.steps, start_offset=self.tail_start, with_offsets=True)
        first = probe.poll(1)
        return first[0][0] if first else self.tail_start

    def _read_manifest(self, b: Batch) -> None:
        try:
            st = os.stat(self.paths.manifest)
        except FileNotFoundError:
            return
        except OSError as e:  # the run dir became unreadable (mode 000, a dead mount)
            self._manifest_mtime, self._manifest_read = None, False
            self._manifest_problem = f"cannot read {safe_text(self.paths.manifest)}: {e.strerror or e}"
            return
        if not stat.S_ISREG(st.st_mode):
            return  # reported by _not_regular; opening a FIFO would block
        mtime = st.st_mtime_ns
        if mtime != self._manifest_mtime:
            self._manifest_mtime = mtime  # an unreadable run.json is read again when it changes
            try:
                self._manifest, notes = read_manifest_checked(self.paths)
            except RunDirError as e:
                self._manifest_problem, self._manifest_read = str(e), False
            else:  # fields of the wrong type were dropped: say which
                more = f" (+{len(notes) - 1} more)" if len(notes) > 1 else ""
                self._manifest_problem, self._manifest_read = (notes[0] + more if notes else ""), True
                b.manifest = self._manifest
        if not self._manifest_read:
            return
        # effective_status notices a dead writer, so it is asked again even when run.json is unchanged
        status = effective_status(self._manifest, self.paths)
        if status != self._status:
            self._status = status
            b.status = status
            if b.manifest is None:
                b.manifest = self._manifest


def load_history(paths: RunPaths, end_offset: int, should_stop=lambda: False):
    """The records before `end_offset`, as one older RunStore plus their alerts over all of it.

    The step log's columnar side file gives the history in array operations where it is
    trusted (tui/fastload.py); the rest is decoded from the log. Alerts are evaluated over
    the whole history (tui/history_alerts.py: the streaming engine, run only where a rule
    could fire). Yields progress fractions while reading; the last value yielded is the
    result tuple (store, alerts, engine: as a streaming pass leaves it after the history's last
    record, corrupt_frames, end: the log offset after the last record it holds). Ends early,
    yielding no result, once `should_stop()` is true.
    """
    rules = load_run_rules(paths.root)[0]  # the rules the tail is evaluated with
    fast = load_columns(paths, end_offset, should_stop)
    if should_stop():
        return
    older, start = (fast.store, fast.end) if fast is not None else (RunStore(), 0)
    covered = start
    yield min(1.0, start / max(1, end_offset))
    t = StepLogTailer(paths.steps, start_offset=start, with_offsets=True, at_frame=True)
    done = start >= end_offset
    while not done and not should_stop():
        batch = t.poll(HISTORY_CHUNK)
        if not batch:
            break
        recs = []
        for first, end, r in batch:
            if first >= end_offset:
                done = True
                break
            recs.append(r)
            covered = end
        older.extend(RunStore.columnize(recs))
        yield min(1.0, t.offset / max(1, end_offset))
        time.sleep(0.001)  # let the UI thread have the GIL between chunks
    if should_stop():
        return
    evaluated = evaluate_history(rules, older, should_stop)
    if evaluated is None:
        return
    alerts, engine = evaluated
    yield older, alerts, engine, t.stats.corrupt_frames, covered
