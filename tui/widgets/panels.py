"""Header, alert banner, profiler and events panels: text views over the app's state."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

from protocol.alerts import Alert
from protocol.catalogue import STAGES

from ..braille import fmt_value
from ..store import RunStore
from .charts import SEVERITY_STYLE, _fmt_duration

STATUS_STYLE = {
    "running": "bold green", "finished": "bold cyan", "stopped": "bold yellow",
    "crashed": "bold white on red", "failed": "bold white on red", "stalled": "bold black on yellow",
}
SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class HeaderInfo:
    run_id: str = "—"
    status: str = "…"
    step: int | None = None
    total_steps: int | None = None
    steps_per_s: float | None = None
    elapsed_s: float | None = None
    age_s: float | None = None
    corrupt: int = 0
    loading: str = ""  # "history 40%" while the background load runs


class RunHeader(Static):
    def show(self, h: HeaderInfo) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" RLHF ", "bold black on bright_cyan")
        t.append(f" {h.run_id} ", "bold")
        t.append(f" {h.status.upper()} ", STATUS_STYLE.get(h.status, "bold"))
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
        self.update(t)


class AlertBanner(Static):
    """The most severe open alert with its explanation; corruption counts here too."""

    def show(self, alert: Alert | None, n_open: int, corrupt: int) -> None:
        self.remove_class("-critical", "-warning", "-ok")
        t = Text(overflow="ellipsis")
        if alert is None and not corrupt:
            self.add_class("-ok")
            t.append("✔ no open alerts", "bold")
            t.append("   a: alert list", "dim")
        elif alert is None:
            self.add_class("-warning")
            t.append(f"✖ step log: {corrupt} corrupt frame{'s' * (corrupt != 1)} skipped", "bold")
            t.append(" (bad bytes on disk; the records around them are intact)   a: alert list")
        else:
            self.add_class("-critical" if alert.severity == "critical" else "-warning")
            t.append(f"{'⛔' if alert.severity == 'critical' else '⚠'} {alert.severity.upper()} {alert.rule}: ", "bold")
            t.append(f"{alert.metric}={fmt_value(alert.value)} (threshold {fmt_value(alert.threshold)}) "
                     f"since step {alert.first_step:,}")
            more = n_open - 1
            if more > 0:
                t.append(f"  (+{more} more)")
            if corrupt:
                t.append(f"  ✖ {corrupt} corrupt frames")
            t.append(f"\n{alert.explanation}   a: alert list")
        self.update(t)


class ProfilerPanel(Static):
    """The last step split by stage, how the shares moved over the run, the slowest stage."""

    def show(self, store: RunStore, width: int) -> None:
        t = Text(no_wrap=True, overflow="crop")
        if not len(store):
            self.update(Text("waiting for records…", "grey50"))
            return
        last = {s: store.stages[s].values[-1] for s in STAGES}
        total = sum(v for v in last.values() if math.isfinite(v)) or math.nan
        finite = {s: v for s, v in last.items() if math.isfinite(v)}
        slowest = max(finite, key=finite.get) if finite else None
        spark_w = max(4, min(24, width - 40))
        n = len(store)
        t.append(f"{'stage':<14}{'ms':>8} {'share':>6}  share over the run\n", "grey62")
        for s in STAGES:
            v = last[s]
            share = v / total if math.isfinite(v) and total == total else math.nan
            style = "bold yellow" if s == slowest else None
            t.append(f"{s:<14}", style)
            t.append(f"{v * 1000:>8.1f} " if math.isfinite(v) else f"{'—':>8} ")
            t.append(f"{share:>6.0%}  " if share == share else f"{'—':>6}  ")
            t.append(self._share_spark(store, s, n, spark_w), "cyan")
            t.append("\n")
        tps = store.value("tokens_per_second")
        st = store.value("step_time_s")
        t.append("slowest: ", "grey62")
        t.append(f"{slowest or '—'}", "bold yellow")
        if slowest and total == total:
            t.append(f" ({finite[slowest] / total:.0%} of the step)")
        t.append(f"\nstep {fmt_value(st)} s · {fmt_value(tps)} tokens/s")
        self.update(t)

    _spark_cache: dict = {}

    def _share_spark(self, store: RunStore, stage: str, n: int, w: int) -> str:
        """Mean share of `stage` over the run, recomputed only when the run grew by ~1%."""
        key = (id(store.steps), stage, w, n * 100 // max(1, n) if n < 100 else n // max(1, n // 100))
        hit = self._spark_cache.get(key)
        if hit is None:
            if len(self._spark_cache) > 64:
                self._spark_cache.clear()
            hit = self._spark_cache[key] = self._compute_spark(store, stage, n, w)
        return hit

    @staticmethod
    def _compute_spark(store: RunStore, stage: str, n: int, w: int) -> str:
        """Mean share of `stage` in each of w slices of the run (sampled, so it costs O(w))."""
        out = []
        step_col = store.stages[stage].values
        stages = store.stages
        for k in range(w):
            a, b = n * k // w, n * (k + 1) // w
            if b <= a:
                out.append(" ")
                continue
            idx = range(a, b, max(1, (b - a) // 32))  # up to 32 samples per slice
            num = den = 0.0
            for i in idx:
                tot = sum(stages[s].values[i] for s in STAGES)
                v = step_col[i]
                if tot > 0 and math.isfinite(v) and math.isfinite(tot):
                    num += v
                    den += tot
            out.append(SPARK[min(7, int(num / den * 8))] if den > 0 else " ")
        return "".join(out)


EVENT_STYLE = {
    "alert": "yellow", "alert_escalated": "bold red", "alert_cleared": "green", "crashed": "bold red",
    "started": "cyan", "resumed": "cyan", "stopped": "yellow", "finished": "cyan", "checkpoint": "grey62",
    "resume_check": "magenta",
}


class EventsPanel(Static):
    """The last lifecycle and alert events of events.jsonl, newest last."""

    def show(self, events: list[dict], rows: int, t0: float | None) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        if not events:
            self.update(Text("no events yet", "grey50"))
            return
        shown = events[-max(1, rows):]
        for i, e in enumerate(shown):
            name = str(e.get("event", "?"))
            when = e.get("time")
            rel = _fmt_duration(when - t0) if isinstance(when, (int, float)) and t0 else "—"
            t.append(f"{rel:>7} ", "grey50")
            t.append(f"{name:<15}", EVENT_STYLE.get(name, None))
            if "rule" in e:
                t.append(f" {e.get('rule')} @{e.get('step', '?')}")
                if name != "alert_cleared" and "value" in e:
                    t.append(f" {e.get('metric', '')}={fmt_value(e['value']) if isinstance(e['value'], float) else e['value']}")
            elif "step" in e:
                t.append(f" step {e['step']}")
            for k in ("passed", "message", "reason", "path"):
                if k in e and "rule" not in e:
                    t.append(f" {k}={e[k]}", "grey62")
            if i < len(shown) - 1:
                t.append("\n")
        self.update(t)


def now() -> float:
    return time.time()
