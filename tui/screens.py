"""Modal screens: help, the alert list, the run picker."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from protocol.alerts import Alert
from protocol.events import open_alerts
from protocol.rundir import RunPaths, find_runs, read_events

from .braille import fmt_value

HELP = """\
[b]Keys[/b]
  ←↑↓→ / hjkl   select a metric (its detail chart is below the grid)
  s             raw / EMA-smoothed detail line
  t             x axis: step / wall time
  z             zoom: whole run → last 10k → 1k → 200 steps
  f             follow the live end again (after jumping to an alert)
  a             alert list (Enter jumps the charts to the alert's step)
  r             run picker (Enter opens a run)
  1 2 3         run trainerd verify m1 / m2 / m3 on this run;  x cancels
  ?             this help;  q quit
[b]Reading the screen[/b]
  values are green / yellow / red against the alert thresholds;
  [white on red]N[/] marks a NaN, [red]▲[/] / [red]▼[/] an ±Inf; ▲ under the detail chart marks an alert;
  the banner shows the most severe open alert (alerts are evaluated here, live).
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text.from_markup(HELP), id="help-text")


class AlertListScreen(ModalScreen[Alert | None]):
    BINDINGS = [Binding("escape,a,q", "dismiss", "close")]

    def __init__(self, alerts: list[tuple[str, Alert]], open_rules: set[str]):
        super().__init__()
        self.alerts = alerts

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text("Alerts (Enter: jump the charts to its step, Esc: close)", "bold"))
            yield DataTable(id="alert-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("step", "event", "severity", "rule", "metric", "value", "explanation")
        for i, (ev, a) in enumerate(reversed(self.alerts)):
            sev_style = {"critical": "bold red", "warning": "yellow"}.get(a.severity, "")
            step = a.cleared_step if ev == "alert_cleared" and a.cleared_step else a.first_step
            table.add_row(
                f"{step:,}",
                ev,
                Text(a.severity, sev_style),
                a.rule,
                a.metric,
                fmt_value(a.value),
                a.explanation[:80],
                key=str(len(self.alerts) - 1 - i),
            )
        if not self.alerts:
            table.add_row("—", "no alerts so far", "", "", "", "", "")
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is not None and key.isdigit():
            self.dismiss(self.alerts[int(key)][1])
        else:
            self.dismiss(None)


class RunPickerScreen(ModalScreen[RunPaths | None]):
    BINDINGS = [Binding("escape,r,q", "dismiss", "close")]

    def __init__(self, runs_dir: Path, current: Path | None):
        super().__init__()
        self.runs_dir = runs_dir
        self.current = current
        self.runs = []

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text(f"Runs in {self.runs_dir} (Enter: open, Esc: close)", "bold"))
            yield DataTable(id="run-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("run", "status", "steps", "open alerts", "started")
        self.runs = list(reversed(find_runs(self.runs_dir)))
        import time as _t

        for i, r in enumerate(self.runs):
            open_alerts = _open_alert_rules(r.paths)
            started = r.manifest.get("started_at")
            when = _t.strftime("%Y-%m-%d %H:%M", _t.localtime(started)) if isinstance(started, (int, float)) else "—"
            mark = "▶ " if self.current and r.paths.root.resolve() == self.current.resolve() else "  "
            table.add_row(
                mark + r.run_id,
                r.status,
                f"{r.manifest.get('last_step') or 0:,}",
                Text(", ".join(sorted(open_alerts)) or "—", "yellow" if open_alerts else "grey50"),
                when,
                key=str(i),
            )
        if not self.runs:
            table.add_row("no runs here", "", "", "", "")
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        self.dismiss(self.runs[int(key)].paths if key is not None and key.isdigit() else None)


def _open_alert_rules(paths: RunPaths) -> set[str]:
    """Alerts the run's writer raised and has not cleared (from its events.jsonl)."""
    return {a["rule"] for a in open_alerts(read_events(paths))}
