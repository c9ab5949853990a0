"""The samples view: what the policy wrote (samples.jsonl, protocol/FORMAT.md's last section).

An alert's advice "read samples" is followed here: `w` on the main screen shows the run's latest
samples; `w` on an alert in the alert list shows the samples of that alert's step, or of the
nearest step that has some. The file is read by a daemon thread through `protocol.jsonl` (a
regular file inside the run dir, lines over 1 MiB skipped), never on the UI thread; what is kept
is bounded (the last `MAX_ROWS` samples, or one step's), and every field is made safe
(`safe_text`, shown as plain Text, never markup) before it reaches the screen.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from protocol.catalogue import finite_value
from protocol.jsonl import JsonlTailer
from protocol.rundir import RunPaths
from protocol.text import safe_text

from .braille import fmt_value
from .follow import one_line, post, spawn

MAX_ROWS = 300  # latest samples kept (100 steps of the kit's trainer: 3 a step)
MAX_STEP_ROWS = 60  # samples kept of the one step asked for
TEXT_MAX = 4000  # characters of a prompt / response kept (the detail pane); the table cuts shorter
COLUMNS = (("step", 8), ("reason", 8), ("pick", 6), ("reward", 9), ("gold", 9), ("KL", 9), ("length", 6))
COLUMNS += (("prompt", 24), ("response", 60))
POLL_S = 1.0  # a live run's file is read again this often while the view is open


@dataclass(frozen=True)
class SampleRow:
    """One line of samples.jsonl, every field already safe to print."""

    step: int | None
    reason: str
    alerts: str
    pick: str
    reward: str
    gold: str
    kl: str
    length: str
    prompt: str
    response: str

    @classmethod
    def of(cls, rec: dict) -> SampleRow:
        step = rec.get("step")
        alerts = rec.get("alerts")
        length = rec.get("length")
        return cls(
            step=step if isinstance(step, int) and not isinstance(step, bool) else None,
            reason=_word(rec.get("reason")),
            alerts=", ".join(_word(a) for a in alerts[:10]) if isinstance(alerts, list) else "",
            pick=_word(rec.get("pick")),
            reward=_num(rec.get("reward")),
            gold=_num(rec.get("gold")),
            kl=_num(rec.get("kl")),
            length=f"{length:,}" if isinstance(length, int) and not isinstance(length, bool) else "—",
            prompt=_text(rec.get("prompt")),
            response=_text(rec.get("response")),
        )


def _word(v: object) -> str:
    return safe_text(v, 40) if isinstance(v, str) else "—"


def _num(v: object) -> str:
    f = finite_value(v)
    return fmt_value(f) if f is not None else ("—" if v is None else safe_text(str(v), 12))


def _text(v: object) -> str:
    return safe_text(v, TEXT_MAX) if isinstance(v, str) else "—"


@dataclass
class SamplesState:
    """What the reader has found so far (posted to the screen as a copy)."""

    rows: list[SampleRow]
    note: str = ""  # why there is nothing, or what could not be read
    step: int | None = None  # with a target step: the step the rows are from
    bad_lines: int = 0


class SampleCollector:
    """Keeps what the view shows from the records read so far: the last `MAX_ROWS`, or with
    `around` the records of the step nearest to it (the later one on a tie)."""

    def __init__(self, around: int | None = None):
        self.around = around
        self.latest: deque[SampleRow] = deque(maxlen=MAX_ROWS)
        self.best: tuple[int, bool] | None = None  # (distance, before the target) of `step`
        self.step: int | None = None
        self.at_step: list[SampleRow] = []

    def add(self, records: list[dict]) -> bool:
        changed = False
        for rec in records:
            if self.around is None:
                self.latest.append(SampleRow.of(rec))
                changed = True
                continue
            step = rec.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                continue
            key = (abs(step - self.around), step < self.around)
            if self.best is None or key < self.best:
                self.best, self.step, self.at_step = key, step, []
            if step == self.step and len(self.at_step) < MAX_STEP_ROWS:
                self.at_step.append(SampleRow.of(rec))
                changed = True
        return changed

    def state(self, note: str = "", bad_lines: int = 0) -> SamplesState:
        rows = list(self.latest) if self.around is None else list(self.at_step)
        return SamplesState(rows, note, self.step, bad_lines)


def read_samples(paths: RunPaths, around: int | None, stop: threading.Event, deliver, live: bool = True) -> None:
    """The reader thread: samples.jsonl through `protocol.jsonl`, caught up, then again every
    `POLL_S` while the view is open (`stop` unset) and the run may still grow. `deliver(state)`
    is called when what is shown should change."""
    tailer = JsonlTailer(paths.samples, root=paths.root)
    keep = SampleCollector(around)
    shown: tuple | None = None
    while not stop.is_set():
        changed = False
        while not stop.is_set():  # a big file comes in budgeted polls: read until caught up
            recs = tailer.poll()
            changed |= keep.add(recs)
            if not recs:
                break
        note = ""
        if tailer.error:
            note = safe_text(tailer.error, 200)
        elif not os.path.lexists(paths.samples):
            note = "this run has no samples.jsonl (yet): its trainer writes none, or has not reached a sample step"
        key = (changed, note, tailer.bad_lines)
        if shown is None or changed or key[1:] != shown[1:]:
            shown = key
            if not deliver(keep.state(note, tailer.bad_lines)):
                return
        if not live or stop.wait(POLL_S):
            return


class SamplesScreen(ModalScreen[None]):
    """The run's samples: a table (step, reason, pick, reward, gold, KL, length, prompt,
    response) and the highlighted sample's full prompt and response below it."""

    BINDINGS = [Binding("escape,w,q", "dismiss", "close")]

    class Read(Message):
        def __init__(self, state: SamplesState):
            super().__init__()
            self.state = state

    def __init__(self, paths: RunPaths, around: int | None = None, why: str = "", live: bool = True):
        super().__init__()
        self.paths, self.around, self.why, self.live = paths, around, why, live
        self.rows: list[SampleRow] = []
        self.state: SamplesState | None = None  # the last state shown (tests read it)
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text(self._title(None), "bold"), id="samples-title")
            yield Static(Text(""), id="samples-note")
            yield DataTable(id="samples-table", cursor_type="row", zebra_stripes=True)
            yield Static(Text(""), id="samples-detail")

    def _title(self, state: SamplesState | None) -> str:
        run = safe_text(self.paths.run_id, 60)
        if self.around is None:
            what = f"latest samples of {run}, newest first"
        else:
            what = f"samples of {run} at step {self.around:,}" + (f" ({self.why})" if self.why else "")
            if state is not None and state.step is not None and state.step != self.around:
                what += f": none at that step; nearest with samples: step {state.step:,}"
        return what + "   (↑↓: a sample's full text below, Esc: close)"

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for name, width in COLUMNS:
            table.add_column(name, width=width)
        self.query_one("#samples-note", Static).update(Text("reading samples…", "grey50"))
        table.focus()
        spawn(self._read, name="samples")

    def on_unmount(self) -> None:
        self._stop.set()

    def _read(self) -> None:
        try:
            read_samples(self.paths, self.around, self._stop, lambda st: post(self, self.Read(st)), self.live)
        except Exception as e:  # never takes the app down: the view says what stopped it
            post(self, self.Read(SamplesState([], "stopped reading samples: " + one_line(e))))

    def on_samples_screen_read(self, msg: Read) -> None:
        st = self.state = msg.state
        self.rows = list(reversed(st.rows)) if self.around is None else st.rows
        self.query_one("#samples-title", Static).update(Text(self._title(st), "bold"))
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for i, r in enumerate(self.rows):
            table.add_row(  # Text cells: a str cell would be read as markup
                Text("—" if r.step is None else f"{r.step:,}"),
                Text(r.reason, "bold red" if r.reason == "alert" else ""),
                Text(r.pick),
                Text(r.reward),
                Text(r.gold),
                Text(r.kl),
                Text(r.length),
                Text(safe_text(r.prompt, 24)),
                Text(safe_text(r.response, 60)),
                key=str(i),
            )
        notes = [st.note or ("" if self.rows else "samples.jsonl holds no samples")]
        if st.bad_lines:
            notes.append(f"{st.bad_lines:,} unreadable line{'s' * (st.bad_lines != 1)} skipped")
        detail = "; ".join(n for n in notes if n)
        self.query_one("#samples-note", Static).update(Text(detail, "yellow"))
        if self.rows:
            table.move_cursor(row=min(row, len(self.rows) - 1))
        self._detail(table.cursor_row)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail(event.cursor_row)

    def _detail(self, i: int) -> None:
        t = Text()
        if 0 <= i < len(self.rows):
            r = self.rows[i]
            t.append(f"step {r.step if r.step is not None else '—'} · {r.reason}", "bold")
            if r.alerts:
                t.append(f" ({r.alerts})", "bold red")
            t.append(f" · {r.pick} · reward {r.reward} · gold {r.gold} · KL {r.kl} · length {r.length}\n")
            t.append("prompt:   ", "grey62")
            t.append(r.prompt + "\n")
            t.append("response: ", "grey62")
            t.append(r.response)
        self.query_one("#samples-detail", Static).update(t)
