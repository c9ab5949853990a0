"""Modal screens: help, the alert list, the run picker."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, OptionList, Static
from textual.widgets.option_list import Option

from protocol.alerts import Alert
from protocol.catalogue import finite_value
from protocol.events import open_alerts
from protocol.rundir import RunPaths, find_runs, read_events
from protocol.text import safe_text

from .braille import fmt_value
from .follow import one_line, post, spawn
from .glyphs import MODE, to_ascii

HELP = """\
[b]Keys[/b]
  ←↑↓→ / hjkl   select a tile (its detail chart is below the grid); a click selects it too;
                on a small terminal the grid shows one row of tiles: moving pages through them
  m             chart any metric of the run (the catalogue's and a framework's own) in the
                selected tile and the detail chart
  [ ]  { }      value cursor on the detail chart (a click puts it there): reads step, time,
                value;  \\ hides it
  s             raw / EMA-smoothed detail line;  S  the EMA factor (0.6 → 0.8 → 0.9 → 0.95 → 0.99)
  t             x axis: step / wall time; comparing runs: aligned by step → time since each
                run's start → tokens trained on
  z             zoom: whole run → last 10k → 1k → 200 steps
  f             follow the live end again (after jumping to an alert)
  e             events shown: all (checkpoints collapsed) → lifecycle → alerts → checkpoints
  p             side panels (box, profiler, checks, events) shown / hidden;  d  detail chart
  g             the box panel (GPUs: utilisation, memory, temperature, power; host CPU and RAM;
                over ssh:// the remote box) shown / hidden
  a             alert list (Enter jumps the charts to the alert's step, w shows its samples)
  w             samples: what the policy wrote (latest first; from the alert list, that step's)
  c             acknowledge the alerts the banner holds against the run (open or cleared);
                until then a run that had a critical alert stays red, even after it cleared
  r             run picker (Enter opens a run; forks under their parent; d: settings diff;
                space: compare the run with the one on screen, or stop comparing it)
  1 2 3         run trainerd verify m1 / m2 / m3 on this run;  x cancels
  ?             this help;  q quit
[b]Reading the screen[/b]
  values and tile charts are green / yellow / red against the alert thresholds (cyan: none;
  with NO_COLOR the value says WARN / CRIT); the numbers left of a tile's chart are its y scale;
  a whole-run chart draws each column's min..max as a grey band and its last value as the line;
  [white on red]N[/] marks a NaN, [red]▲[/] / [red]▼[/] an ±Inf; ▲ under the detail chart marks an alert;
  the banner is the run's verdict: the open alert that came first (the likely cause, with
  its full explanation) and the others as its likely consequences; an alert that cleared
  stays until you acknowledge it (c); a crashed, stopped or stalled run says what to run next;
  a critical alert says which fork to try ("try: trainerd fork RUN --from-step K --set ..."):
  text to copy, the monitor never runs it.
  The terminal bell rings once on each new critical alert of a live run (rlhf-tui --no-bell: never).
  The run picker lists a fork under its parent with what it changed (└ fork@40 kl_coef 0.2→0.4).
  Alerts are evaluated here, live, with the rules the run was started with (its alerts.json).
  Comparing runs (rlhf-tui A B C, or space in the run picker): each run has a letter and a
  colour, in every chart, the legend under the header and the tiles' values (A 0.12 B 0.15);
  the banner is A's, with a line for each other run that has an alert or a problem; the
  profiler compares the stages' time and share over each run's last 100 steps.
"""


def _ascii_help() -> str:
    return to_ascii(HELP).replace("?-?", "<-^v->")


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="dialog"):  # a small terminal scrolls it: every key is reachable
            yield Static(Text.from_markup(_ascii_help() if MODE.ascii else HELP), id="help-text")


class AlertListScreen(ModalScreen[Alert | None]):
    """Every alert event of the run, newest first, each with its full explanation; Enter jumps
    the charts to the alert's step, `w` shows the samples of that step."""

    BINDINGS = [
        Binding("escape,a,q", "dismiss", "close"),
        Binding("w", "samples", "samples of its step"),
    ]

    def __init__(
        self,
        alerts: list[tuple[str, Alert]],
        paths: RunPaths | None = None,
        live: bool = True,
        open_keys: set[tuple[object, object]] | None = None,
        runs: list | None = None,
    ):
        super().__init__()
        self.alerts = alerts
        self.paths = paths
        self.live = live
        self.open_keys = open_keys or set()  # (rule, first step) of the alerts open now
        # comparing runs: the run (tui.overlay.ComparedRun) of each alert, and a `run` column;
        # open_keys are then (letter, rule, first step)
        self.runs = runs

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(
                Text("Alerts (Enter: jump the charts to its step, w: samples of its step, Esc: close)", "bold")
            )
            yield DataTable(id="alert-table", cursor_type="row", zebra_stripes=True)
            yield Static(id="alert-explanation")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # a narrow terminal: no metric and value columns, and the highlighted alert's explanation
        # in full under the table instead of in a column too narrow to read
        narrow = self.narrow = self.app.size.width < 120
        cols = [("run", 3)] if self.runs else []
        cols += [("step", 8), ("event", 15), ("now", 7), ("severity", 8), ("rule", 20)]
        if not narrow:
            cols += [("metric", 18), ("value", 9)]
        for name, width in cols:
            table.add_column(name, width=width)
        if not narrow:
            used = sum(w + 2 for _n, w in cols) + 10  # cell padding, the dialog's border and padding
            table.add_column("explanation", width=max(30, self.app.size.width * 9 // 10 - used))
        still_open = set(self.open_keys)
        n = len(self.alerts)
        for i, (ev, a) in enumerate(reversed(self.alerts)):
            sev_style = {"critical": "bold red", "warning": "yellow"}.get(a.severity, "")
            run = self.runs[n - 1 - i] if self.runs else None
            key = (a.rule, a.first_step) if run is None else (run.label, a.rule, a.first_step)
            cells = [Text(run.label, f"bold {run.colour}")] if run is not None else []
            cells += [  # Text cells: a str cell would be read as markup
                Text(f"{self.step_of(ev, a):,}"),
                Text(ev),
                Text("open", "bold") if key in still_open else Text("cleared", "green"),
                Text(safe_text(a.severity, 20), sev_style),
                Text(safe_text(a.rule, 60)),
            ]
            if not narrow:
                cells += [Text(safe_text(a.metric, 60)), Text(fmt_value(a.value))]
                cells.append(Text(safe_text(a.explanation, 2000)))  # in full: the row is as tall as it needs
            table.add_row(*cells, key=str(len(self.alerts) - 1 - i), height=None)
        if not self.alerts:
            table.add_row(
                *[""] * bool(self.runs),
                Text("—"),
                Text("no alerts so far"),
                *[""] * (len(table.columns) - 2 - bool(self.runs)),
            )
        self.query_one("#alert-explanation").display = narrow
        table.focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if getattr(self, "narrow", False) and key is not None and key.isdigit():
            ev, a = self.alerts[int(key)]
            text = Text(f"{safe_text(a.metric, 60)} {fmt_value(a.value)}: ", "bold")
            text.append(safe_text(a.explanation, 2000))
            self.query_one("#alert-explanation", Static).update(text)

    @staticmethod
    def step_of(ev: str, a: Alert) -> int:
        """The step an event happened at, as the events panel says it: cleared at its clear
        step, fired (or escalated) at the step the rule fired, not the first bad step."""
        if ev == "alert_cleared" and a.cleared_step:
            return a.cleared_step
        return a.step if isinstance(a.step, int) else a.first_step

    def _selected_index(self) -> int | None:
        table = self.query_one(DataTable)
        if not self.alerts or table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return int(key) if key is not None and key.isdigit() else None

    def _selected(self) -> tuple[str, Alert] | None:
        i = self._selected_index()
        return self.alerts[i] if i is not None else None

    def action_samples(self) -> None:
        """The samples of the highlighted alert's step: the step it fired (or escalated, or
        cleared) at, where the trainer writes samples, or the nearest step that has some."""
        from .samples import SamplesScreen  # samples imports follow, as this module does

        i = self._selected_index()
        picked = self.alerts[i] if i is not None else None
        paths = self.runs[i].model.paths if i is not None and self.runs else self.paths
        if picked is None or paths is None:
            return
        ev, a = picked
        step = a.cleared_step if ev == "alert_cleared" and a.cleared_step else a.step
        what = {"alert": "fired", "alert_escalated": "escalated", "alert_cleared": "cleared"}.get(ev, ev)
        why = f"{safe_text(a.rule, 60)} {what} there"
        self.app.push_screen(SamplesScreen(paths, around=step, why=why, live=self.live))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is not None and key.isdigit():
            self.dismiss(self.alerts[int(key)][1])
        else:
            self.dismiss(None)


class RunPickerScreen(ModalScreen["RunRow | None"]):
    """The runs of a runs dir, newest first; listed by a reader thread (a run's events are read
    for its open alerts), the table fills in when the list arrives."""

    BINDINGS = [
        Binding("escape,r,q", "dismiss", "close"),
        Binding("d", "diff", "settings diff"),
        Binding("space", "compare", "compare"),
    ]

    class Listed(Message):
        def __init__(self, rows: list[RunRow], error: str = ""):
            super().__init__()
            self.rows, self.error = rows, error

    def __init__(self, runs_dir: Path, current: Path | None):
        super().__init__()
        self.runs_dir = runs_dir
        self.current = current
        self.rows: list[RunRow] = []
        self.error = ""
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(
                Text(
                    f"Runs in {safe_text(str(self.runs_dir))} (Enter: open, space: compare with the run "
                    "on screen / stop comparing, d: settings diff with it, Esc: close)",
                    "bold",
                )
            )
            yield DataTable(id="run-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("", "run", "status", "steps", "open alerts", "started")
        table.add_row("", Text("reading the runs…", "grey50"), "", "", "", "")
        table.focus()
        spawn(self._list, self.runs_dir, self.current, name="runs")

    def on_unmount(self) -> None:
        self._stop.set()

    def _list(self, runs_dir: Path, current: Path | None) -> None:
        try:
            msg = self.Listed(list_runs(runs_dir, current, self._stop.is_set))
        except Exception as e:
            msg = self.Listed([], one_line(e))
        post(self, msg)

    def on_run_picker_screen_listed(self, msg: Listed) -> None:
        self.rows, self.error = msg.rows, msg.error
        self._fill()

    def _compared(self, row: RunRow):
        """The compared run (tui/overlay.py) a row is, if it is one."""
        comparison = getattr(self.app, "comparison", None)
        return comparison.by_root(row.paths.root) if comparison is not None and comparison.active else None

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for i, r in enumerate(self.rows):
            compared = self._compared(r)
            mark = Text(f" {compared.label} ", f"bold reverse {compared.colour}") if compared is not None else Text("")
            name = Text(("▶ " if r.current else "  ") + "  " * max(0, r.depth - 1))
            if r.depth:  # a fork, right under its parent: what it changed, from which step
                name.append("└ ", "grey50")
                name.append(r.run_id)
                name.append(f"  {r.lineage}", "cyan")
            else:
                name.append(r.run_id)
                if r.lineage:  # a fork whose parent is not in this runs dir: named
                    name.append(f"  {r.lineage}", "cyan")
            table.add_row(
                mark,
                name,
                Text(r.status),
                Text(r.steps),
                Text(", ".join(r.open_alerts) or "—", "yellow" if r.open_alerts else "grey50"),
                Text(r.started),
                key=str(i),
            )
        if self.error:
            table.add_row("", Text(f"cannot list the runs: {safe_text(self.error, 200)}", "red"), "", "", "", "")
        elif not self.rows:
            table.add_row("", Text("no runs here"), "", "", "", "")
        if 0 <= cursor < table.row_count:
            table.move_cursor(row=cursor)

    def action_compare(self) -> None:
        """Draw the highlighted run over the one on screen (or stop drawing it)."""
        i = self.query_one(DataTable).cursor_row
        toggle = getattr(self.app, "toggle_compare", None)
        if toggle is not None and 0 <= i < len(self.rows):
            self.app.notify(toggle(self.rows[i].paths), markup=False, timeout=3)
            self._fill()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        self.dismiss(self.rows[int(key)] if key is not None and key.isdigit() else None)

    def action_diff(self) -> None:
        """The settings that differ between the run on screen and the highlighted one."""
        from .compare_screen import DiffScreen

        i = self.query_one(DataTable).cursor_row
        current = next((r for r in self.rows if r.current), None)
        if current is not None and 0 <= i < len(self.rows):
            self.app.push_screen(DiffScreen(current.paths.root, self.rows[i].paths.root))


@dataclass
class RunRow:
    """One run as the picker shows it; every field from the run's files made safe to print."""

    paths: RunPaths
    run_id: str
    status: str
    steps: str
    open_alerts: list[str]
    started: str
    current: bool  # the run on screen
    is_latest: bool  # where the runs dir's `latest` points
    lineage: str = ""  # a fork's "fork@40 kl_coef 0.2→0.4" ("fork of <parent>@40 ..." if its parent is elsewhere)
    depth: int = 0  # 0: listed on its own; n: a fork n levels under a run listed above it
    parent_key: tuple[str, str] | None = None  # (resolved run dir, run id) of the parent named in run.json
    parent_id: str = ""


def _fmt_change_value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (int, str)) and not isinstance(v, bool):
        return safe_text(str(v), 24)
    return safe_text(repr(v), 24)


def parse_parent(manifest: dict) -> tuple[str, str, int | None, str] | None:
    """(parent run id, parent run dir, step, "kl_coef 0.2→0.4") from run.json's `parent`
    (written by `trainerd fork`); None when there is none or it is not an object. Every
    part is read defensively: a missing or wrong-typed field is left out, never trusted."""
    p = manifest.get("parent")
    if not isinstance(p, dict):
        return None
    run_id = p.get("run_id") if isinstance(p.get("run_id"), str) else ""
    run_dir = p.get("run_dir") if isinstance(p.get("run_dir"), str) else ""
    step = p.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
    changed = p.get("changed")
    parts = []
    if isinstance(changed, dict):
        for key, pair in list(changed.items())[:4]:
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                parts.append(f"{safe_text(key, 40)} {_fmt_change_value(pair[0])}→{_fmt_change_value(pair[1])}")
            else:
                parts.append(f"{safe_text(key, 40)} ?")
        if len(changed) > 4:
            parts.append(f"+{len(changed) - 4} more")
    if not run_id and run_dir:
        run_id = Path(run_dir).name
    return safe_text(run_id, 80), run_dir, step, ", ".join(parts)


def _lineage_order(rows: list[RunRow]) -> list[RunRow]:
    """`rows` (newest first) with each fork moved right under its parent (depth-first, forks of
    one parent newest first); a fork whose parent is not listed stays where it was."""
    by_dir = {str(r.paths.root.resolve()): i for i, r in enumerate(rows)}
    by_id = {r.paths.run_id: i for i, r in enumerate(rows)}
    parent_of: dict[int, int] = {}
    for i, r in enumerate(rows):
        if r.parent_key is None:
            continue
        pdir, pid = r.parent_key
        j = by_dir.get(pdir) if pdir else None
        if j is None and pid:
            j = by_id.get(pid)
        if j is not None and j != i:
            parent_of[i] = j
    # a cycle (hand-edited run.json files): its members are listed on their own
    for i in list(parent_of):
        seen, k = {i}, parent_of.get(i)
        while k is not None:
            if k in seen:
                parent_of.pop(i, None)
                break
            seen.add(k)
            k = parent_of.get(k)
    children: dict[int, list[int]] = {}
    for i, j in parent_of.items():
        children.setdefault(j, []).append(i)
    out: list[RunRow] = []

    def visit(i: int, depth: int) -> None:
        r = rows[i]
        r.depth = depth
        if depth and r.lineage.startswith("fork of "):
            r.lineage = "fork" + r.lineage[len("fork of ") + len(r.parent_id) :]
        out.append(r)
        for c in sorted(children.get(i, [])):
            visit(c, depth + 1)

    for i in range(len(rows)):
        if i not in parent_of:
            visit(i, 0)
    return out


def list_runs(runs_dir: Path, current: Path | None, should_stop=lambda: False) -> list[RunRow]:
    """The runs of `runs_dir`, newest first, each fork right under its parent (file IO: called
    off the UI thread)."""
    try:
        latest = (runs_dir / "latest").resolve(strict=True)
    except OSError:
        latest = None
    current = current.resolve() if current else None
    rows = []
    for r in reversed(find_runs(runs_dir)):
        if should_stop():
            break
        root = r.paths.root.resolve()
        last_step = r.manifest.get("last_step")
        started = finite_value(r.manifest.get("started_at"))
        try:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started is not None else "—"
        except (OverflowError, OSError, ValueError):
            when = "?"
        parent = parse_parent(r.manifest)
        lineage, parent_key, parent_id = "", None, ""
        if parent is not None:
            parent_id, parent_dir, step, change = parent
            at = f"@{step}" if step is not None else ""
            lineage = f"fork of {parent_id or '?'}{at}" + (f" {change}" if change else "")
            try:
                resolved = str(Path(parent_dir).resolve()) if parent_dir else ""
            except (OSError, ValueError, RuntimeError):
                resolved = ""
            parent_key = (resolved, parent_id)
        rows.append(
            RunRow(
                paths=r.paths,
                run_id=safe_text(r.run_id, 80),
                status=safe_text(str(r.status), 20),
                steps=f"{last_step:,}" if isinstance(last_step, int) and not isinstance(last_step, bool) else "0",
                open_alerts=sorted({safe_text(str(a["rule"]), 40) for a in open_alerts(read_events(r.paths))}),
                started=when,
                current=root == current,
                is_latest=root == latest,
                lineage=lineage,
                parent_key=parent_key,
                parent_id=parent_id,
            )
        )
    return _lineage_order(rows)


class MetricPickerScreen(ModalScreen[str | None]):
    """Every metric the run has (the catalogue's, then another framework's own names): Enter
    charts it in the selected tile and the detail chart."""

    BINDINGS = [Binding("escape,m,q", "dismiss", "close")]

    def __init__(self, names: list[str], current: str):
        super().__init__()
        self.names, self.current = names, current

    def compose(self) -> ComposeResult:
        from protocol.catalogue import METRICS

        with Vertical(id="dialog"):
            yield Static(Text("Chart which metric? (Enter: chart it in the selected tile, Esc: close)", "bold"))
            opts = []
            for n in self.names:
                m = METRICS.get(n)
                label = Text(safe_text(n, 60), "bold" if n == self.current else "")
                if m is not None:
                    label.append(f"  {safe_text(m.unit, 20)}  {safe_text(m.description, 120)}", "grey62")
                else:
                    label.append("  (this run's own name)", "grey62")
                opts.append(Option(label, id=n))
            yield OptionList(*opts, id="metric-list")

    def on_mount(self) -> None:
        ol = self.query_one(OptionList)
        if self.current in self.names:
            ol.highlighted = self.names.index(self.current)
        ol.focus()

    def on_option_list_option_selected(self, event) -> None:
        self.dismiss(event.option.id)
