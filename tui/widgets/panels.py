"""Header, alert banner, profiler and events panels: text views over the app's state."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

from protocol.alerts import Alert
from protocol.catalogue import STAGES, stage_shares
from protocol.text import safe_text

from ..braille import fmt_value
from ..model import HeaderInfo, finite
from ..store import RunStore
from .charts import _fmt_duration

STATUS_STYLE = {
    "running": "bold green",
    "finished": "bold cyan",
    "stopped": "bold yellow",
    "crashed": "bold white on red",
    "failed": "bold white on red",
    "stalled": "bold black on yellow",
}
SPARK = "▁▂▃▄▅▆▇█"


class RunHeader(Static):
    def show(self, h: HeaderInfo) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" RLHF ", "bold black on bright_cyan")
        t.append(f" {safe_text(h.run_id)} ", "bold")
        t.append(f" {safe_text(h.status).upper()} ", STATUS_STYLE.get(h.status, "bold"))
        step = "—" if h.step is None else f"{h.step:,}"
        if h.total_steps:
            step += f"/{h.total_steps:,}"
        t.append(f"  step {step}")
        t.append(f"  {fmt_value(h.steps_per_s)} steps/s" if h.steps_per_s else "  — steps/s")
        if h.total_steps and h.steps_per_s and h.step is not None and h.status in ("running", "stalled"):
            t.append(f"  ETA {_fmt_duration(max(0, h.total_steps - h.step) / h.steps_per_s)}")
        if h.elapsed_s is not None:
            t.append(f"  elapsed {_fmt_duration(h.elapsed_s)}")
        if h.age_s is not None:
            t.append(f"  last record {_fmt_duration(h.age_s)} ago", "grey62")
        if h.corrupt:
            t.append(f"  ✖ {h.corrupt} corrupt", "bold red")
        if h.loading:
            t.append(f"  ⟳ {h.loading}", "grey62")
        _update(self, t)


class AlertBanner(Static):
    """The most severe open alert with its explanation; corruption counts and what could not
    be read (`notice`, one line) show here too."""

    def show(self, alert: Alert | None, n_open: int, corrupt: int, notice: str = "") -> None:
        self.remove_class("-critical", "-warning", "-ok")
        t = Text(overflow="ellipsis")
        if alert is None and not corrupt and not notice:
            self.add_class("-ok")
            t.append("✔ no open alerts", "bold")
            t.append("   a: alert list", "dim")
        elif alert is None:
            self.add_class("-warning")
            if notice:
                t.append(f"✖ {safe_text(notice)}", "bold")
            if corrupt:
                t.append("  " if notice else "")
                t.append(f"✖ step log: {corrupt} corrupt frame{'s' * (corrupt != 1)} skipped", "bold")
                t.append(" (bad bytes on disk; the records around them are intact)")
            t.append("   a: alert list")
        else:
            self.add_class("-critical" if alert.severity == "critical" else "-warning")
            head = f"{'⛔' if alert.severity == 'critical' else '⚠'} {alert.severity.upper()} {alert.rule}: "
            t.append(safe_text(head), "bold")
            t.append(
                safe_text(f"{alert.metric}={fmt_value(alert.value)} (threshold {fmt_value(alert.threshold)}) ")
                + f"since step {alert.first_step:,}"
            )
            more = n_open - 1
            if more > 0:
                t.append(f"  (+{more} more)")
            if corrupt:
                t.append(f"  ✖ {corrupt} corrupt frames")
            if notice:
                t.append(f"  ✖ {safe_text(notice)}")
            t.append(f"\n{safe_text(alert.explanation)}   a: alert list")
        _update(self, t, layout=True)


class ProfilerPanel(Static):
    """The last step split by stage, how the shares moved over the run, the slowest stage."""

    BORDER_TITLE = "where the time goes"

    LEAD = 31  # "stage" 14 + "ms" 9 + "share" 6 + 2 spaces, then the sparkline
    RANGE = 8  # then the range of the share over the run, "20–26%"

    def show(self, store: RunStore, width: int) -> None:
        t = Text(no_wrap=True, overflow="crop")
        if not len(store):
            _update(self, Text("waiting for records…", "grey50"))
            return
        last = {s: store.stages[s].values[-1] for s in STAGES}
        shares = stage_shares(last)
        timed = {s: v for s, v in last.items() if math.isfinite(v)}
        slowest = max(timed, key=timed.get) if timed and any(shares.values()) else None
        spark_w = max(4, width - self.LEAD - self.RANGE)
        sparks = share_sparklines(store, spark_w)
        t.append(
            f"{'stage':<14}{'ms':>8} {'share':>6}  " + "share over the run"[: spark_w + self.RANGE] + "\n", "grey62"
        )
        for s in STAGES:
            v = last[s]
            share = shares[s] if math.isfinite(v) and slowest else math.nan
            style = "bold yellow" if s == slowest else None
            t.append(f"{s:<14}", style)
            t.append(f"{v * 1000:>8.1f} " if math.isfinite(v) else f"{'—':>8} ")
            t.append(f"{share:>6.0%}  " if share == share else f"{'—':>6}  ")
            line, rng = sparks[s]
            t.append(line, "yellow" if s == slowest else "cyan")
            t.append(rng.rjust(self.RANGE), "grey62")
            t.append("\n")
        tps = store.value("tokens_per_second")
        st = store.value("step_time_s")
        t.append("slowest: ", "grey62")
        t.append(f"{slowest or '—'}", "bold yellow")
        if slowest:
            t.append(f" ({shares[slowest]:.0%} of the step)")
        t.append(f"\nstep {fmt_value(st)} s · {fmt_value(tps)} tokens/s")
        t.append("\nsparklines scaled from each stage's low to high", "grey50")
        _update(self, t)


def share_shares(store: RunStore, columns: int) -> dict[str, list[float | None]]:
    """Each stage's share of the step time in `columns` equal slices of the run: the sum of the
    stage's seconds over the sum of all stages' seconds (block sums make it O(columns))."""
    n = len(store)
    k = min(columns, n)
    out: dict[str, list[float | None]] = {s: [] for s in STAGES}
    cols = store.stages
    for i in range(k):
        a, b = n * i // k, n * (i + 1) // k
        shares = stage_shares({s: cols[s].sum(a, b) for s in STAGES})
        timed = any(shares.values())  # all 0.0: nothing was timed in this slice
        for s in STAGES:
            out[s].append(shares[s] if timed else None)
    return out


def share_sparklines(store: RunStore, width: int) -> dict[str, tuple[str, str]]:
    """Per stage: a sparkline of its share over the run, decimated to `width` columns (a short
    run: one column per step), scaled from its lowest to its highest share, and that range as a
    label ("20–26%"). A stage whose share stays within the label's precision is drawn flat."""
    shares = share_shares(store, width)
    out = {}
    for s, row in shares.items():
        seen = [x for x in row if x is not None]
        if not seen:
            out[s] = (" " * len(row), "")
            continue
        lo, hi = min(seen), max(seen)
        if round(lo * 100) == round(hi * 100):
            out[s] = ("".join(" " if x is None else SPARK[3] for x in row), f"{hi:.0%}")
            continue
        span = hi - lo
        out[s] = (
            "".join(" " if x is None else SPARK[min(7, int((x - lo) / span * 8))] for x in row),
            f"{lo * 100:.0f}–{hi:.0%}",
        )
    return out


def _update(widget: Static, content: Text, layout: bool = False) -> None:
    """Update a panel: nothing at all when the text is unchanged; a fixed-size panel
    without a re-layout."""
    key = (content.plain, tuple(content.spans))
    if getattr(widget, "_shown_key", None) != key:
        widget._shown_key = key
        widget.update(content, layout=layout)


EVENT_STYLE = {
    "alert": "yellow",
    "alert_escalated": "bold red",
    "alert_cleared": "green",
    "crashed": "bold red",
    "started": "cyan",
    "resumed": "cyan",
    "stopped": "yellow",
    "finished": "cyan",
    "checkpoint": "grey62",
    "resume_check": "magenta",
}


class EventsPanel(Static):
    """The last lifecycle and alert events of events.jsonl, newest last."""

    BORDER_TITLE = "events"

    def show(self, events: list[dict], rows: int, t0: float | None) -> None:
        """Every field is run-file text: shown through safe_text, as plain Text (no markup)."""
        t = Text(no_wrap=True, overflow="ellipsis")
        if not events:
            _update(self, Text("no events yet", "grey50"))
            return
        shown = events[-max(1, rows) :]
        for i, e in enumerate(shown):
            name = _field(e.get("event", "?"), 40)
            when = finite(e.get("time"))
            rel = _fmt_duration(when - t0) if when is not None and t0 is not None else "—"
            t.append(f"{rel:>7} ", "grey50")
            t.append(f"{name:<15}", EVENT_STYLE.get(name, None))
            if "rule" in e:
                t.append(f" {_field(e.get('rule'))} @{_field(e.get('step', '?'))}")
                if name != "alert_cleared" and "value" in e:
                    v = e["value"]
                    t.append(f" {_field(e.get('metric', ''))}={fmt_value(v) if isinstance(v, float) else _field(v)}")
            elif "step" in e:
                t.append(f" step {_field(e['step'])}")
            for k in ("passed", "message", "reason", "path"):
                if k in e and "rule" not in e:
                    t.append(f" {k}={_field(e[k])}", "grey62")
            if i < len(shown) - 1:
                t.append("\n")
        _update(self, t)


def _field(v, max_len: int = 200) -> str:
    """An event's field as one safe line (strings, numbers, or whatever else the file held)."""
    return safe_text(v if isinstance(v, str) else str(v), max_len)
