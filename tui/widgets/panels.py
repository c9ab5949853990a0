"""Header, alert banner, profiler and events panels: text views over the app's state."""

from __future__ import annotations

import math
import statistics

from rich.text import Text
from textual.strip import Strip
from textual.widgets import Static

from protocol.alerts import DEFAULT_RULES
from protocol.catalogue import STAGES, finite_value, stage_shares
from protocol.health import Verdict, describe_past, worst_severity
from protocol.text import safe_text

from ..braille import fmt_value
from ..glyphs import MODE, g
from ..model import HeaderInfo, RunModel
from ..store import RunStore
from .charts import StripWidget, _fmt_duration
from .lines import Runs, cells_of, text_runs

STATUS_STYLE = {
    "running": "bold green",
    "finished": "bold cyan",
    "stopped": "bold yellow",
    "crashed": "bold white on red",
    "failed": "bold white on red",
    "stalled": "bold black on yellow",
}
SPARK = "▁▂▃▄▅▆▇█"
# the gpu_underused rule's threshold: the profiler's "GPU n% busy" is yellow under it
GPU_BUSY_LOW = next((r.threshold for r in DEFAULT_RULES if r.name == "gpu_underused"), 40.0)


LEVEL_STYLE = {"critical": "bold white on red", "warning": "bold black on yellow"}
LEVEL_BADGE = {"critical": "⛔ CRITICAL", "warning": "⚠ WARNING"}


class RunHeader(StripWidget):
    """One line: the run, its status and verdict, the step, rate, ETA, elapsed. Redrawn on every
    value frame, so only the cells that changed are sent (the step's last digits, mostly)."""

    DEFAULT_CSS = "RunHeader { height: 1; }"

    def __init__(self, **kw):
        super().__init__(**kw)
        self._text = Text()
        self._runs: Runs | None = None  # the runs of `_text` (None: not made yet)

    def render(self) -> Text:
        return self._text

    def render_line(self, y: int) -> Strip:
        w = self.content_size.width
        base = self.visual_style.rich_style
        if y != 0:
            return self._strip([], w, base)
        if self._runs is None:
            self._runs = text_runs(self._text, self.app.console)
        self._drawing(0, self._runs)
        return self._strip(self._runs, w, base)

    def show(self, h: HeaderInfo) -> None:
        self._text = t = self.header_text(h)
        self._runs = text_runs(t, self.app.console)
        self._mark_changed(0, self._runs)

    @staticmethod
    def header_text(h: HeaderInfo) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" RLHF ", "bold black on bright_cyan")
        t.append(f" {safe_text(h.run_id)} ", "bold")
        level = h.verdict.level
        style = STATUS_STYLE.get(h.status, "bold")
        if level != "healthy" and h.status in ("running", "finished"):
            style = "bold"  # never green (or calm cyan) on a run whose verdict is not healthy
        t.append(f" {safe_text(h.status).upper()} ", style)
        if level in LEVEL_BADGE:  # an alert open or one that fired, not yet acknowledged
            t.append(" ")
            badge = LEVEL_BADGE[level] if not MODE.ascii else level.upper()
            t.append(f" {badge} ", LEVEL_STYLE[level])
        if h.phase:  # before the first PPO step: what the trainer is doing, and how far it is
            t.append(f"  {safe_text(h.phase, 60)}", "bold")
        step = g("dash") if h.step is None else f"{h.step:,}"
        if h.total_steps:
            step += f"/{h.total_steps:,}"
        t.append(f"  step {step}")
        # 3 significant digits: the rate's jitter in the 4th would redraw the header every frame
        t.append(f"  {h.steps_per_s:.3g} steps/s" if h.steps_per_s else f"  {g('dash')} steps/s")
        if h.total_steps and h.steps_per_s and h.step is not None and h.status in ("running", "stalled"):
            t.append(f"  ETA {_fmt_eta(max(0, h.total_steps - h.step) / h.steps_per_s)}")
        if h.elapsed_s is not None:
            t.append(f"  elapsed {_fmt_duration(h.elapsed_s)}")
        if h.age_s is not None:
            t.append(f"  last record {_fmt_duration(h.age_s)} ago", "grey62")
        if h.corrupt:
            t.append(f"  {g('bad')} {h.corrupt} corrupt", "bold red")
        if h.loading:
            t.append(f"  {g('loading')} {h.loading}", "grey62")
        return t


def _fmt_eta(s: float) -> str:
    """An estimate to the precision it has: '2h47m', '47m', '3:05' (seconds only under 10 min),
    so that it does not change, and get sent again, on every frame."""
    if not math.isfinite(s):
        return "?"
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    if s >= 600:
        return f"{int(s // 60)}m"
    return _fmt_duration(s)


SEVERITY_ICON = {"critical": "⛔", "warning": "⚠"}
BAD_STATUS = ("crashed", "failed")


class AlertBanner(Static):
    """The run's verdict (`protocol.health.run_verdict`): what to do about the run's state,
    the open alert to read first (the root cause: the earliest) with its full explanation and
    the others named as its likely consequences, or an alert that fired and cleared, until the
    user acknowledges it. Corruption counts and what could not be read (one line) show here too."""

    def show(self, h: HeaderInfo, model: RunModel, others=()) -> None:
        """`others`: (ComparedRun, HeaderInfo) of the runs compared with this one; each one
        that is not healthy gets a line naming it, its letter in its colour."""
        v = h.verdict
        corrupt, notice = model.corrupt, model.notice()
        lines: list[Text] = []
        if v.next_step:
            line = Text()
            line.append(f"✖ {safe_text(h.status).upper()}: ", "bold")
            line.append(safe_text(v.next_step))
            lines.append(line)
        if v.cause is not None:
            lines.extend(self._open(v, model))
            hint = model.fork_hint(v)
            if hint:  # text to copy, never run: what the alert's advice means as a fork
                line = Text()
                line.append("try: ", "bold")
                line.append(safe_text(hint, 400))
                lines.append(line)
        elif v.past:
            lines.extend(self._past(v, model))
        problems = Text()
        if notice:
            problems.append(f"✖ {safe_text(notice)}", "bold")
        if corrupt:
            problems.append("  " if notice else "")
            problems.append(f"✖ step log: {corrupt} corrupt frame{'s' * (corrupt != 1)} skipped", "bold")
            problems.append(" (bad bytes on disk; the records around them are intact)")
        if problems.plain:
            lines.append(problems)
        if not lines:
            ok = Text()
            ok.append(f"✔ {v.headline}", "bold")
            lines.append(ok)
        worst = v.level
        if others:
            first = others[0][0]  # the letter of the run this banner is about
            lines[0] = Text.assemble((f"{first.label} ", f"bold {first.colour}"), lines[0])
            for run, oh in others[1:]:
                line = other_run_line(run, oh)
                if line is not None:
                    lines.append(line)
                    if oh.verdict.level == "critical" or oh.status in BAD_STATUS:
                        worst = "critical"
                    elif worst == "healthy":
                        worst = "warning"
        keys = "   a: alert list · w: samples" + (" · c: acknowledge" if v.unacknowledged else "")
        lines[-1].append(keys, "dim")
        if worst == "critical" or h.status in BAD_STATUS:
            cls = "-critical"
        elif worst == "warning" or v.next_step or problems.plain:
            cls = "-warning"
        elif v.cause is not None:
            cls = "-acked"  # open, but acknowledged by the user
        else:
            cls = "-ok"
        for c in ("-critical", "-warning", "-ok", "-acked"):
            self.set_class(c == cls, c)
        t = Text("\n", overflow="ellipsis").join(lines)
        _update(self, t, layout=True)

    @staticmethod
    def _open(v: Verdict, model: RunModel) -> list[Text]:
        cause = v.cause
        assert cause is not None
        alert = model.open_alert(cause.get("rule"))
        severity = str(alert.severity if alert is not None else cause.get("severity"))
        head = Text()
        head.append(f"{SEVERITY_ICON.get(severity, '⚠')} {safe_text(severity.upper(), 20)} ", "bold")
        head.append(safe_text(cause.get("rule"), 60), "bold")
        if alert is not None:  # what the rule compared (a spike's median, both trends of a trend rule...)
            detail = getattr(alert, "detail", "")
            what = detail or f"{alert.metric}={fmt_value(alert.value)} (threshold {fmt_value(alert.threshold)})"
            head.append(": " + safe_text(what))
        head.append(f" since step {safe_text(cause.get('first_step'), 20)}")
        if v.consequences:
            others = ", ".join(safe_text(e.get("rule"), 60) for e in v.consequences)
            head.append(f"; likely consequences: {others}", "bold")
        lines = [head, Text(safe_text(cause.get("explanation") or cause.get("message") or ""))]
        if v.past:
            lines.append(Text("earlier: " + _past_line(v, model)))
        return lines

    @staticmethod
    def _past(v: Verdict, model: RunModel) -> list[Text]:
        ep = v.past[0]
        head = Text()
        head.append(f"{SEVERITY_ICON.get(worst_severity(ep), '⚠')} ", "bold")
        head.append(_past_line(v, model), "bold")
        return [head, Text(safe_text(ep.get("explanation") or ep.get("message") or ""))]


def other_run_line(run, h: HeaderInfo) -> Text | None:
    """A compared run's state in one banner line, named by its letter in its colour (None
    while it is healthy and running or finished)."""
    v, m = h.verdict, run.model
    problem = m.notice() or (f"{m.corrupt} corrupt frames skipped" if m.corrupt else "")
    if v.level == "healthy" and h.status not in (*BAD_STATUS, "stalled", "stopped") and not problem:
        return None
    t = Text()
    t.append(f"{run.label} ", f"bold {run.colour}")
    t.append(f"{safe_text(run.name, 60)}: ", "bold")
    if v.cause is not None:
        cause = v.cause
        sev = str(cause.get("severity", "warning"))
        t.append(f"{SEVERITY_ICON.get(sev, '⚠')} {safe_text(sev.upper(), 20)} ", "bold")
        t.append(safe_text(cause.get("rule"), 60), "bold")
        alert = m.open_alert(cause.get("rule"))
        if alert is not None:
            t.append(f" {safe_text(alert.metric, 40)}={fmt_value(alert.value)}")
        t.append(f" since step {safe_text(cause.get('first_step'), 20)}")
        if v.consequences:
            t.append(f" (+{len(v.consequences)} more open)")
    elif v.past:
        t.append(safe_text(describe_past(v.past[0]), 200))
    elif h.status in (*BAD_STATUS, "stalled", "stopped"):
        t.append(safe_text(h.status).upper(), "bold")
    if problem:
        t.append(f"  ✖ {safe_text(problem, 200)}", "bold")
    return t


class CompareLegend(StripWidget):
    """Comparing runs: one line per run under the header, its letter and line in its colour,
    its name, status, step, rate and open alerts (the header above is the first run's). Drawn
    with the Line API like the header: of each line only the cells that changed are sent."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._lines: list[Text] = []

    def render(self) -> Text:
        return Text("\n").join(self._lines)

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self._lines)

    def render_line(self, y: int) -> Strip:
        w = self.content_size.width
        runs = text_runs(self._lines[y], self.app.console) if y < len(self._lines) else []
        self._shown[y] = cells_of(runs)
        return self._strip(runs, w, self.visual_style.rich_style)

    def show(self, rows) -> None:
        """`rows`: (ComparedRun, HeaderInfo) per run."""
        lines = [self.legend_line(run, h) for run, h in rows]
        grew = len(lines) != len(self._lines)
        self._lines = lines
        if grew:
            self._forget_shown()
            self.refresh(layout=True)
            return
        for y, t in enumerate(lines):
            self._mark_changed(y, text_runs(t, self.app.console))

    @staticmethod
    def legend_line(run, h: HeaderInfo) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        line = "━━" if not MODE.ascii else "--"
        t.append(f" {run.label} {line} ", f"bold {run.colour}")
        t.append(f"{safe_text(run.name, 60)}  ", "bold")
        t.append(safe_text(h.status).upper(), STATUS_STYLE.get(h.status, "bold"))
        step = g("dash") if h.step is None else f"{h.step:,}"
        if h.total_steps:
            step += f"/{h.total_steps:,}"
        t.append(f"  step {step}")
        if h.steps_per_s:
            t.append(f"  {h.steps_per_s:.3g} steps/s")
        open_alerts = run.model.open_alerts
        if open_alerts:
            sev = "critical" if any(a.severity == "critical" for a in open_alerts) else "warning"
            icon = SEVERITY_ICON[sev] if not MODE.ascii else "!"
            rules = [safe_text(a.rule, 40) for a in open_alerts]
            t.append(f"  {icon} {', '.join(rules[:3])}", "bold red" if sev == "critical" else "yellow")
            if len(rules) > 3:
                t.append(f" +{len(rules) - 3}")
        if run.model.link:
            t.append(f"  {safe_text(run.model.link, 80)}", "bold yellow")
        if h.loading:
            t.append(f"  {g('loading')} {h.loading}", "grey62")
        return t


def _past_line(v: Verdict, model: RunModel) -> str:
    """'reward_hacking was critical at steps 20-32, value then 0.9359; now reward_mean 1.126,
    gold_reward_mean -0.3773 (cleared, not acknowledged)'."""
    ep = v.past[0]
    now = model.now_text(ep)
    text = safe_text(describe_past(ep)) + (f"; now {now}" if now else "")
    if not ep.get("open") and ep.get("cleared_step") is not None:
        text += " (cleared, not acknowledged)"
    else:
        text += " (not acknowledged)"
    return text + (f" (+{len(v.past) - 1} more)" if len(v.past) > 1 else "")


class ProfilerPanel(Static):
    """The last step split by stage, how the shares moved over the run, the slowest stage."""

    BORDER_TITLE = "where the time goes"

    LEAD = 31  # "stage" 14 + "ms" 9 + "share" 6 + 2 spaces, then the sparkline
    RANGE = 8  # then the range of the share over the run, "20–26%"

    def show(self, store: RunStore, width: int, comparison=None) -> None:
        t = Text(no_wrap=True, overflow="crop")
        if comparison is not None and comparison.active:
            self.set_class(False, "ranks")
            _update(self, compare_stage_text(comparison.runs, width))
            return
        if not len(store):
            _update(self, Text("waiting for records…", "grey50"))
            return
        last = {s: store.stages[s].values[-1] for s in STAGES}
        shares = stage_shares(last)
        timed = {s: v for s, v in last.items() if math.isfinite(v)}
        slowest = max(timed, key=timed.get) if timed and any(shares.values()) else None
        peaks = getattr(store, "stage_peaks", None) or {}  # last step's peak memory per stage, if recorded
        peak_w = 10 if peaks else 0
        spark_w = width - self.LEAD - self.RANGE - peak_w
        # the share-over-the-run column, unless the peak-memory column leaves it no room
        history = spark_w >= 4 or not peaks
        spark_w = max(4, spark_w)
        sparks = share_sparklines(store, spark_w) if history else {}
        t.append(
            f"{'stage':<14}{'ms':>8} {'share':>6}  "
            + (f"{'peak MiB':>8}  " if peaks else "")
            + ("share over the run"[: spark_w + self.RANGE] if history else "")
            + "\n",
            "grey62",
        )
        for s in STAGES:
            v = last[s]
            share = shares[s] if math.isfinite(v) and slowest else math.nan
            style = "bold yellow" if s == slowest else None
            t.append(f"{s:<14}", style)
            t.append(f"{v * 1000:>8.1f} " if math.isfinite(v) else f"{'—':>8} ")
            t.append(f"{share:>6.0%}  " if share == share else f"{'—':>6}  ")
            if peaks:
                p = peaks.get(s, math.nan)
                t.append(f"{p / 2**20:>8.0f}  " if math.isfinite(p) else f"{'—':>8}  ", "grey70")
            if history:
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
        util = store.value("gpu_util_mean")  # on CUDA (trainerd/run/gpu.py): is the GPU busy at all?
        if util is not None and math.isfinite(util):
            t.append(f" · GPU {util:.0f}% busy", "yellow" if util < GPU_BUSY_LOW else None)
        t.append("\nsparklines scaled from each stage's low to high", "grey50")
        ranks = rank_rows(store)
        if ranks:
            t.append("\n\n")
            t.append(rank_table(ranks))
        self.set_class(bool(ranks), "ranks")  # taller: the per-rank view below the stages
        _update(self, t)


COMPARE_WINDOW = 100  # a compared run's stage times: the mean of its last this many steps


def compare_stage_text(runs, width: int) -> Text:
    """Comparing runs: each stage's mean milliseconds and share of the step over each run's
    last COMPARE_WINDOW steps, a column per run (its letter in its colour), each run's slowest
    stage in bold, its step time and tokens/s below. `runs`: tui.overlay.ComparedRun."""
    t = Text(no_wrap=True, overflow="crop")
    col_w = 10  # " 41.6  59%"
    shown = list(runs)[: max(1, (width - 13) // col_w)]  # what fits; the legend names them all
    t.append(f"{'ms, share':<13}", "grey62")
    for r in shown:
        t.append(f"{r.label:>{col_w}}", f"bold {r.colour}")
    if len(shown) < len(runs):
        t.append(f" (+{len(runs) - len(shown)}: wider)", "grey50")
    t.append("\n")
    means: list[dict[str, float]] = []
    for r in shown:
        store = r.model.store
        n = len(store)
        a = max(0, n - COMPARE_WINDOW)
        means.append({s: store.stages[s].sum(a, n) / (n - a) if n > a else math.nan for s in STAGES})
    shares = [stage_shares(m) for m in means]
    slowest = [max(sh, key=lambda s: sh.get(s, 0.0)) if any(sh.values()) else None for sh in shares]
    for s in STAGES:
        t.append(f"{s:<13}")
        for m, sh, slow in zip(means, shares, slowest):
            v = m[s]
            if math.isfinite(v) and slow:
                t.append(f"{v * 1000:>5.3g} {sh.get(s, 0.0):>4.0%}", "bold yellow" if s == slow else None)
            else:
                t.append(f"{'—':>5} {'—':>4}")
        t.append("\n")
    for label, key in (("step s", "step_time_s"), ("tokens/s", "tokens_per_second")):
        t.append(f"{label:<13}")
        for r in shown:
            t.append(f"{fmt_value(r.model.store.value(key)):>{col_w}}")
        t.append("\n")
    t.append(f"mean of each run's last {COMPARE_WINDOW} steps", "grey50")
    return t


def rank_rows(store: RunStore) -> list[dict]:
    """A data-parallel run's ranks at its last step (from the flattened rank_* columns): per
    rank its step, compute (before the collectives) and collective seconds, and the stage where
    it spends the most over the other ranks' median. [] for a single-process run."""
    cols = store.columns

    def last(key: str) -> float | None:
        c = cols.get(key)
        return finite_value(c.values[-1]) if c is not None and len(c.values) else None

    ranks = sorted(
        (k.split(".", 1)[1] for k in store.extra if k.startswith("rank_compute_s.")),
        key=lambda r: (len(r), r),
    )
    rows = []
    for r in ranks:
        compute = last(f"rank_compute_s.{r}")
        if compute is None:
            continue
        stages = {s: last(f"rank_stage_s.{r}.{s}") for s in STAGES}
        rows.append(
            {
                "rank": r,
                "step": last(f"rank_step_time_s.{r}"),
                "compute": compute,
                "comm": last(f"rank_comm_s.{r}"),
                "stages": stages,
            }
        )
    if len(rows) < 2:
        return []
    for row in rows:
        others = [o["compute"] for o in rows if o is not row]
        med = statistics.median(others)
        row["ratio"] = row["compute"] / med if med > 0 else math.nan
        excess = {}
        for s, v in row["stages"].items():
            ov = [o["stages"][s] for o in rows if o is not row and o["stages"][s] is not None]
            if v is not None and ov:
                excess[s] = v - statistics.median(ov)
        row["stage"] = max(excess, key=excess.get) if excess else None
        row["stage_excess"] = excess.get(row["stage"], 0.0) if row["stage"] else 0.0
    return rows


def rank_table(rows: list[dict]) -> Text:
    """Per-rank timing view: which rank is slow and in which stage (the straggler rule's view:
    compute time before the collectives against the other ranks' median)."""
    t = Text(no_wrap=True, overflow="crop")
    t.append(f"{'rank':<5}{'step':>7}{'compute':>8}{'comm':>6}{'x med':>7}  slowest stage (ms)\n", "grey62")
    worst = max(rows, key=lambda r: r["ratio"] if r["ratio"] == r["ratio"] else 0.0)
    for row in rows:
        slow = row is worst and row["ratio"] > 1.25
        style = "bold yellow" if slow else None

        def ms(v):
            return f"{v * 1000:.0f}" if v is not None else "—"

        t.append(f"{safe_text(row['rank'], 4):<5}", style)
        t.append(f"{ms(row['step']):>7}{ms(row['compute']):>8}{ms(row['comm']):>6}")
        t.append(f"{row['ratio']:>6.2f}x" if row["ratio"] == row["ratio"] else f"{'—':>7}", style)
        stage = row["stage"]
        t.append(f"  {stage} +{row['stage_excess'] * 1000:.0f} ms" if stage and row["stage_excess"] > 0 else "  —")
        t.append("\n")
    t.append("compute: before the collectives; comm: in them", "grey50")
    return t


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


EVENT_FILTERS = ("all", "lifecycle", "alerts", "checkpoints")
_ALERT_EVENTS = ("alert", "alert_escalated", "alert_cleared")


def _kind(name: str) -> str:
    if name in _ALERT_EVENTS:
        return "alerts"
    if name == "checkpoint":
        return "checkpoints"
    return "lifecycle"


class EventsPanel(Static):
    """The last lifecycle and alert events of events.jsonl, newest last. `e` filters them;
    in "all", checkpoints (one every few steps) are collapsed into one line per run of them,
    so alerts do not scroll away."""

    BORDER_TITLE = "events"

    def show(self, events: list[dict], rows: int, t0: float | None, which: str = "all") -> None:
        """Every field is run-file text: shown through safe_text, as plain Text (no markup)."""
        title = "events" if which == "all" else f"events: {which} only"
        if self.border_title != title:
            self.border_title = title
        if self.border_subtitle != "e: filter":
            self.border_subtitle = "e: filter"
        t = Text(no_wrap=True, overflow="ellipsis")
        if which != "all":
            events = [e for e in events if _kind(_field(e.get("event", "?"), 40)) == which]
        if not events:
            _update(self, Text("no events yet" if which == "all" else f"no {which} events", "grey50"))
            return
        lines: list[tuple[dict, int]] = []  # (event, how many checkpoints it stands for)
        for e in events:
            again = lines and lines[-1][0].get("event") == "checkpoint"
            if which == "all" and e.get("event") == "checkpoint" and again:
                lines[-1] = (e, lines[-1][1] + 1)
            else:
                lines.append((e, 1))
        shown = lines[-max(1, rows) :]
        for i, (e, count) in enumerate(shown):
            name = _field(e.get("event", "?"), 40)
            when = finite_value(e.get("time"))
            rel = _fmt_duration(when - t0) if when is not None and t0 is not None else g("dash")
            t.append(f"{rel:>7} ", "grey50")
            t.append(f"{name:<15}", EVENT_STYLE.get(name, None))
            if "rule" in e:
                t.append(f" {_field(e.get('rule'))} @{_field(e.get('step', '?'))}")
                if name != "alert_cleared" and "value" in e:
                    v = e["value"]
                    t.append(f" {_field(e.get('metric', ''))}={fmt_value(v) if isinstance(v, float) else _field(v)}")
            elif "step" in e:
                t.append(f" step {_field(e['step'])}")
            if count > 1:
                t.append(f" (x{count}, the last shown)", "grey50")
            for k in ("passed", "message", "reason", "path"):
                if k in e and "rule" not in e and count == 1:
                    t.append(f" {k}={_field(e[k])}", "grey62")
            if i < len(shown) - 1:
                t.append("\n")
        _update(self, t)


def _field(v, max_len: int = 200) -> str:
    """An event's field as one safe line (strings, numbers, or whatever else the file held)."""
    return safe_text(v if isinstance(v, str) else str(v), max_len)


class KeyBar(Static):
    """The keys, on the last line: drawn once (Textual's Footer repaints itself whole on
    changes that do not concern it, which costs a line of bytes each time over SSH)."""

    def __init__(self, bindings, **kw):
        super().__init__(**kw)
        t = Text(no_wrap=True, overflow="ellipsis")
        for b in bindings:
            if getattr(b, "show", True) and b.description:
                key = b.key.split(",")[0]
                key = {"question_mark": "?"}.get(key, key)
                t.append(f" {key} ", "bold")
                t.append(f"{b.description} ")
        self._keys = t

    def on_mount(self) -> None:
        self.update(self._keys)
