"""The stability figures of runs loaded by analysis.py, and the three ways out of them: PNGs and
a Markdown report in a folder (`export`, the notebook and `trainerd report --plots DIR`), and
one self-contained HTML file (`render_html`, `trainerd report --format html`).

Figures are `matplotlib.figure.Figure` objects made without pyplot (no global state, no GUI
backend: they render with Agg, and a notebook displays them inline). Several runs overlay:
one colour per run. Every string from a run dir (run ids, alert explanations, model samples)
is escaped in HTML and made terminal-safe in Markdown.

The figures, for runs R:
- `metric-<name>.png` per stability metric: raw values (thin) and an EMA (thick), the alert
  rules' thresholds (dashed: orange warning, red critical), each alert's span shaded from its
  first step to its clear step (or the run's end), NaN/Inf values as red marks at the top;
- `stages.png`: seconds per stage per step (stacked, smoothed), one panel per run;
- `correlation-<run>.png`: Pearson r of step-to-step changes between the stability metrics;
- `lagged-<run>.png`: r(lag) between the changes of KL, entropy, reward and gold reward;
- `alert-<n>-<rule>.png` per alert (the first of each rule in a run): the metrics that moved
  most in the steps before it, normalised, with the alert's step marked.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from protocol import catalogue
from protocol.text import safe_text
from trainerd.tools import analysis
from trainerd.tools.analysis import Run
from trainerd.tools.report import _fmt, _sample_line

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
SEVERITY_COLORS = {"critical": "#d62728", "warning": "#ff9f1c"}
DPI = 96
TOP_MOVERS = 6
MAX_ALERTS = 60  # alerts analysed in a report (a long run's hundreds would drown the first ones)


@dataclass
class Plot:
    """One figure and where it goes: `file` in an export, its section and caption in a report."""

    file: str
    section: str  # "metric", "stages", "correlation", "lagged", "alert"
    title: str
    figure: Figure
    metric: str | None = None
    run: str | None = None
    alert: int | None = None  # the alert's number (1..) across the runs
    data: bytes | None = None  # the PNG, when kept after an export (for an HTML report of the same figures)


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "run"


def _unit(metric: str) -> str:
    m = catalogue.METRICS.get(metric)
    return f" ({m.unit})" if m and m.unit else ""


# -- the figures -------------------------------------------------------------------------------


def metric_figure(runs: list[Run], metric: str, span: int | None = None) -> Figure:
    """A stability metric over steps, raw and smoothed, with thresholds and alert spans."""
    fig = Figure(figsize=(9, 3.2), dpi=DPI)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.15)  # fixed: a layout engine doubles the time
    ax = fig.add_subplot()
    drawn_lines: set[tuple[str, float]] = set()
    log = _wants_log(runs, metric)
    shown = _y_range(runs, metric, log)
    for i, r in enumerate(runs):
        c = _color(i)
        label = r.name if len(runs) > 1 else None
        for _, ep in r.alerts.iterrows():
            first, end = analysis.step_of(ep["first_step"]), analysis.step_of(ep["end_step"])
            own = ep["metric"] == metric
            if first is None or not (own or metric in _rule_metrics(r, str(ep["rule"]))):
                continue  # another metric's alert (a multi-metric rule's, non_finite say, is shaded lighter)
            sev = SEVERITY_COLORS.get(str(ep["severity"]), "#999999")
            end = end if end is not None and end >= first else first
            ax.axvspan(first - 0.5, end + 0.5, color=sev, alpha=0.13 if own else 0.07, lw=0)
        if metric not in r.steps:
            continue
        s = r.steps[metric]
        fin = s[np.isfinite(s)]
        if log:
            fin = fin[fin > 0]
        ax.plot(
            fin.index, fin.to_numpy(), color=c, lw=0.8, alpha=0.35 if len(fin) > 1 else 1, marker="." * (len(fin) < 2)
        )
        sm = analysis.smooth(s, span)
        if log:
            sm = sm[sm > 0]
        ax.plot(sm.index, sm.to_numpy(), color=c, lw=1.8, label=label)
        bad = r.nonfinite[r.nonfinite["metric"] == metric]
        if len(bad):
            ax.plot(
                bad["step"],
                [1.0] * len(bad),
                "x",
                color="#d62728",
                ms=8,
                mew=2,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                label=f"NaN/Inf ({r.name})" if len(runs) > 1 else "NaN/Inf",
            )
        for kind, sev, thr in r.thresholds(metric):
            for t in (thr, -thr) if kind == "abs_above" else (thr,):
                if (sev, t) in drawn_lines or (log and t <= 0):
                    continue
                drawn_lines.add((sev, t))
                where = "" if shown is None or shown[0] <= t <= shown[1] else " (off the chart)"
                ax.axhline(t, color=SEVERITY_COLORS.get(sev, "#999999"), ls="--", lw=1, label=f"{sev} {_fmt(t)}{where}")
        if metric == "kl" and "kl_target" in r.steps:
            kt = r.finite("kl_target")
            if len(kt):
                ax.plot(kt.index, kt.to_numpy(), color=c, ls=":", lw=1, label="kl_target" if i == 0 else None)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{metric}{_unit(metric)}", loc="left", fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if shown is not None:
        ax.set_ylim(*shown)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", framealpha=0.8)
    return fig


def _rule_metrics(run: Run, rule: str) -> tuple[str, ...]:
    for r in run.rules:
        if r.name == rule:
            return r.metrics
    return ()


def _wants_log(runs: list[Run], metric: str) -> bool:
    """A log axis for a positive metric spanning over three decades (grad norm spikes)."""
    vals = np.concatenate([r.finite(metric).to_numpy() for r in runs if metric in r.steps] or [np.zeros(0)])
    if len(vals) < 2 or (vals <= 0).any():
        return False
    return float(vals.max() / max(float(np.median(vals)), 1e-300)) > 1e3


def _y_range(runs: list[Run], metric: str, log: bool) -> tuple[float, float] | None:
    """The y range: the data, and the thresholds near it (within half the data's range); a
    threshold far away would squash the data into a line. None: leave it to matplotlib."""
    vals = np.concatenate([r.finite(metric).to_numpy() for r in runs if metric in r.steps] or [np.zeros(0)])
    if log or not len(vals):
        return None
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo or abs(hi) or 1.0
    near = [
        t
        for r in runs
        for kind, _, thr in r.thresholds(metric)
        for t in ((thr, -thr) if kind == "abs_above" else (thr,))
        if lo - span / 2 <= t <= hi + span / 2
    ]
    lo, hi = min([lo, *near]), max([hi, *near])
    pad = (hi - lo) * 0.06 or span * 0.1
    return lo - pad, hi + pad


def stages_figure(runs: list[Run], span: int | None = None) -> Figure | None:
    """Seconds per stage per step, stacked (smoothed), one panel per run; None without timings."""
    with_stages = [r for r in runs if any(c.startswith("stage_s.") for c in r.steps.columns)]
    if not with_stages:
        return None
    h = 2.6 * len(with_stages) + 0.6
    fig = Figure(figsize=(10, h), dpi=DPI)
    fig.subplots_adjust(left=0.07, right=0.8, top=1 - 0.35 / h, bottom=0.5 / h, hspace=0.35)
    axes = fig.subplots(len(with_stages), 1, squeeze=False, sharex=True)[:, 0]
    cmap = dict(
        zip(catalogue.STAGES, ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#bab0ac"))
    )
    for ax, r in zip(axes, with_stages):
        df = analysis.stages(r)
        sm = df.apply(lambda col: analysis.smooth(col, span)).fillna(0.0)
        summ = analysis.stage_summary(r)
        labels = [f"{s} {100 * summ.loc[s, 'share']:.0f}%" for s in sm.columns]
        colors = [cmap.get(s, COLORS[i % len(COLORS)]) for i, s in enumerate(sm.columns)]
        ax.stackplot(sm.index, sm.T.to_numpy(), labels=labels, colors=colors, alpha=0.9)
        ax.set_title(f"{r.name}: seconds per stage per step (share of the step)", loc="left", fontsize=10)
        ax.set_ylabel("s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1].set_xlabel("step")
    return fig


def correlation_figure(run: Run) -> Figure | None:
    """Heatmap of Pearson r between the step-to-step changes of the stability metrics."""
    corr = analysis.correlations(run)
    if corr.shape[0] < 2:
        return None
    n = corr.shape[0]
    side = max(2.0, 0.3 * n)  # inches of the square heatmap; fixed margins for labels and the colour bar
    left, bottom, top, right = 1.6, 1.5, 0.4, 1.4
    w, h = left + side + right, bottom + side + top
    fig = Figure(figsize=(w, h), dpi=DPI)
    ax = fig.add_axes((left / w, bottom / h, side / w, side / h))
    cax = fig.add_axes(((left + side + 0.15) / w, bottom / h, 0.18 / w, side / h))
    im = ax.imshow(corr.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), corr.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), corr.index, fontsize=7)
    if n <= 20:
        for (i, j), v in np.ndenumerate(corr.to_numpy(dtype=float)):
            if math.isfinite(v) and i != j and abs(v) >= 0.5:
                ax.text(
                    j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="white" if abs(v) > 0.8 else "black"
                )
    fig.colorbar(im, cax=cax, label="r of step-to-step changes")
    ax.set_title(f"{run.name}: which metrics move together", loc="left", fontsize=10)
    return fig


def lagged_figure(run: Run, max_lag: int = 10) -> Figure | None:
    """r(lag) of each pair of KL, entropy, reward, gold reward (changes; lag > 0: a leads b)."""
    lag = analysis.lagged_correlations(run, max_lag=max_lag)
    if lag.empty:
        return None
    pairs = list(dict.fromkeys(zip(lag["a"], lag["b"])))
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    h = 2.3 * rows + 0.9
    fig = Figure(figsize=(3.3 * cols, h), dpi=DPI)
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.55 / h, bottom=0.55 / h, hspace=0.45, wspace=0.12)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for k, (a, b) in enumerate(pairs):
        ax = axes[k // cols][k % cols]
        g = lag[(lag["a"] == a) & (lag["b"] == b)]
        ax.bar(g["lag"], g["r"].fillna(0.0), color=["#d62728" if v < 0 else "#1f77b4" for v in g["r"].fillna(0)])
        ax.axvline(0, color="k", lw=0.6)
        ax.set_ylim(-1, 1)
        ax.set_title(f"{a} → {b}", fontsize=9)
        ax.grid(alpha=0.3)
    for k in range(len(pairs), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle(
        f"{run.name}: lagged correlations of step-to-step changes (lag > 0: left one moves first)", fontsize=10
    )
    fig.supxlabel("lag (steps)", fontsize=9)
    return fig


def alert_figure(run: Run, alert, movers, window: int = analysis.WINDOW) -> Figure:
    """The top movers before an alert, each scaled to its own range, around the alert's step."""
    first = analysis.step_of(alert["first_step"]) or 0
    lo, hi = first - window, first + max(3, window // 2)
    frame = run.steps.loc[(run.steps.index >= lo) & (run.steps.index <= hi)]
    fig = Figure(figsize=(10, 3.4), dpi=DPI)
    fig.subplots_adjust(left=0.07, right=0.64, top=0.9, bottom=0.15)
    ax = fig.add_subplot()
    names = [alert["metric"]] if alert["metric"] in frame else []
    names += [m for m in movers.index if m not in names][: TOP_MOVERS - len(names)]
    for i, m in reversed(list(enumerate(names))):  # the alert's own metric last, on top
        s = frame[m].where(np.isfinite(frame[m]))
        span = s.max() - s.min()
        norm = (s - s.min()) / span if span and math.isfinite(span) and span > 0 else s * 0 + 0.5
        z = movers.loc[m, "z"] if m in movers.index else math.nan
        ax.plot(
            norm.index,
            norm.to_numpy(),
            color=_color(i),
            lw=2.2 if i == 0 else 1.3,
            label=f"{m} [{_fmt(s.min())} .. {_fmt(s.max())}]" + (f" z={z:+.1f}" if math.isfinite(z) else ""),
        )
    sev = SEVERITY_COLORS.get(str(alert["severity"]), "#999999")
    end = analysis.step_of(alert["end_step"])
    end = end if end is not None and end >= first else first
    ax.axvspan(first - 0.5, min(end, hi) + 0.5, color=sev, alpha=0.12, lw=0)
    ax.axvline(first, color=sev, lw=1.5)
    ax.set_title(
        f"{run.name}: {alert['rule']} ({alert['severity']}) at step {first}: what moved before it",
        loc="left",
        fontsize=10,
    )
    ax.set_xlabel("step")
    ax.set_ylabel("scaled to each metric's range")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


# -- all of them ---------------------------------------------------------------------------------


def plots(runs: list[Run], span: int | None = None, window: int = analysis.WINDOW) -> Iterator[Plot]:
    """Every figure of the runs, one at a time (render and close each before the next)."""
    for m in analysis.metrics_of(runs):
        yield Plot(f"metric-{m}.png", "metric", m, metric_figure(runs, m, span), metric=m)
    fig = stages_figure(runs, span)
    if fig is not None:
        yield Plot("stages.png", "stages", "stage breakdown", fig)
    multi = len(runs) > 1
    for r in runs:
        suffix = f"-{_slug(r.name)}" if multi else ""
        fig = correlation_figure(r)
        if fig is not None:
            yield Plot(f"correlation{suffix}.png", "correlation", f"correlations: {r.name}", fig, run=r.name)
        fig = lagged_figure(r)
        if fig is not None:
            yield Plot(f"lagged{suffix}.png", "lagged", f"lagged correlations: {r.name}", fig, run=r.name)
    drawn: set[tuple[str, str]] = set()
    for n, (r, _, ep) in enumerate(alert_list(runs)[:MAX_ALERTS], start=1):
        if (r.name, str(ep["rule"])) in drawn:  # a rule firing again: its table, not another figure
            continue
        drawn.add((r.name, str(ep["rule"])))
        movers = analysis.precursors(r, ep, window)
        yield Plot(
            f"alert-{n}-{_slug(str(ep['rule']))}.png",
            "alert",
            f"alert {n}: {ep['rule']}",
            alert_figure(r, ep, movers, window),
            run=r.name,
            alert=n,
        )


def alert_list(runs: list[Run]) -> list[tuple[Run, int, object]]:
    """(run, row number, alert row) of every alert with a first step, run by run, in firing order."""
    out = []
    for r in runs:
        for i, ep in r.alerts.iterrows():
            if analysis.step_of(ep["first_step"]) is not None:
                out.append((r, int(i), ep))
    return out


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 4})
    return buf.getvalue()


# -- a folder: PNGs and report.md -----------------------------------------------------------------


@dataclass
class Export:
    folder: Path
    plots: list[Plot]  # what was written, in report order (figures freed: `path` reads them back)
    report: Path
    seconds: float

    @property
    def files(self) -> list[str]:
        return [p.file for p in self.plots]

    def paths(self, section: str, run: str | None = None, alert: int | None = None) -> list[Path]:
        """The PNGs of one section ("metric", "stages", "correlation", "lagged", "alert")."""
        return [
            self.folder / p.file
            for p in self.plots
            if p.section == section and (run is None or p.run == run) and (alert is None or p.alert == alert)
        ]


def export(
    runs: list[Run], folder: str | Path, span: int | None = None, window: int = analysis.WINDOW, keep: bool = False
) -> Export:
    """Write every figure as PNG and a Markdown report that shows them to `folder` (created);
    `keep`: keep each PNG in its Plot (`render_html(runs, rendered=export.plots)` reuses them)."""
    t0 = time.perf_counter()
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise analysis.AnalysisError(f"cannot create {safe_text(out)}: {e.strerror or e}") from None
    done: list[Plot] = []
    for p in plots(runs, span, window):
        data = png(p.figure)
        try:
            (out / p.file).write_bytes(data)
        except OSError as e:
            raise analysis.AnalysisError(f"cannot write {safe_text(out / p.file)}: {e.strerror or e}") from None
        p.figure = None  # type: ignore[assignment]  # free it: a long run has many
        p.data = data if keep else None
        done.append(p)
    md = render_markdown(runs, done, window)
    (out / "report.md").write_text(md, encoding="utf-8")
    return Export(out, done, out / "report.md", time.perf_counter() - t0)


def md_text(v) -> str:
    """Run text for Markdown: terminal-safe, HTML escaped (Markdown renders inline HTML), pipes escaped."""
    return html.escape(safe_text(str(v)), quote=False).replace("|", "\\|")


_t = md_text


def _run_rows(r: Run) -> list[tuple[str, str]]:
    fu = r.first_unstable
    rows = [("path", r.path), ("status", r.status)]
    if r.framework:
        rows.append(("framework", r.framework))
    rows += [
        ("steps", f"{len(r.steps)} ({r.steps.index.min()}..{r.last_step})" if len(r.steps) else "0"),
        ("step log", f"{r.source or '-'}, {r.corrupt_frames} corrupt frame(s) skipped"),
    ]
    if r.injection:
        rows.append(("injection", r.injection))
    rows += [
        ("alerts", f"{len(r.alerts)} ({r.alert_source})"),
        ("unstable from", f"step {fu['step']}: {fu['reason']}" if fu else "never (stable)"),
    ]
    rows += [("note", n) for n in r.notes]
    return rows


def alert_heading(n: int, r: Run, ep) -> str:
    cleared = analysis.step_of(ep["cleared_step"])
    end = "still open" if ep["open"] else f"cleared at step {cleared}" if cleared is not None else "cleared"
    return f"Alert {n}: {ep['rule']} ({ep['severity']}) in {r.name} at step {analysis.step_of(ep['first_step'])}, {end}"


def render_markdown(runs: list[Run], done: list[Plot], window: int = analysis.WINDOW) -> str:
    by_section: dict[str, list[Plot]] = {}
    for p in done:
        by_section.setdefault(p.section, []).append(p)
    names = ", ".join(r.name for r in runs)
    out = [f"# Stability analysis: {_t(names)}", ""]
    for r in runs:
        out += [f"## Run {_t(r.name)}", "", "| | |", "|---|---|"]
        out += [f"| {k} | {_t(v)} |" for k, v in _run_rows(r)]
        out.append("")
    out += [
        "## Stability metrics",
        "",
        "Raw (thin) and smoothed (thick); dashed: alert thresholds; shaded: alert spans; red x: NaN/Inf.",
        "",
    ]
    out += [f"![{p.metric}]({p.file})" for p in by_section.get("metric", [])]
    out += ["", "## Stages", ""]
    out += [f"![stages]({p.file})" for p in by_section.get("stages", [])] or ["No stage timings in the step log."]
    for r in runs:
        if any(c.startswith("stage_s.") for c in r.steps.columns):
            out += ["", f"{_t(r.name)}:", "", "| stage | mean s | share |", "|---|---:|---:|"]
            for s, row in analysis.stage_summary(r).iterrows():
                out.append(f"| {_t(s)} | {_fmt(row['mean_s'])} | {100 * row['share']:.1f}% |")
    out += [
        "",
        "## Correlations",
        "",
        "Pearson r of step-to-step changes; lagged: r(lag) = corr(change of a at t, change of b at t + lag).",
        "",
    ]
    for r in runs:
        out += [f"![correlations {_t(r.name)}]({p.file})" for p in by_section.get("correlation", []) if p.run == r.name]
        out += [f"![lagged {_t(r.name)}]({p.file})" for p in by_section.get("lagged", []) if p.run == r.name]
        ll = analysis.lead_lag(analysis.lagged_correlations(r))
        if len(ll):
            out += [
                "",
                f"{_t(r.name)}, lead and lag:",
                "",
                "| a | b | best lag | r | r at 0 | leads |",
                "|---|---|---:|---:|---:|---|",
            ]
            out += [
                f"| {x.a} | {x.b} | {x.best_lag} | {x.r:+.2f} | {_fmt(x.r_at_0)} | {x.leads} |" for x in ll.itertuples()
            ]
        out.append("")
    out += ["## Instability analysis", ""]
    alerts = alert_list(runs)
    if not alerts:
        out.append("No alert fired.")
    elif len(alerts) > MAX_ALERTS:
        out += [f"The first {MAX_ALERTS} of {len(alerts)} alerts (`trainerd report` lists them all).", ""]
    figs = {p.alert: p for p in by_section.get("alert", [])}
    for n, (r, _, ep) in enumerate(alerts[:MAX_ALERTS], start=1):
        out += [f"### {_t(alert_heading(n, r, ep))}", ""]
        if ep["message"]:
            out += [_t(ep["message"]), ""]
        elif ep["explanation"]:
            out += [_t(ep["explanation"]), ""]
        if n in figs:
            out += [f"![alert {n}]({figs[n].file})", ""]
        movers = analysis.precursors(r, ep, window)
        out += [
            f"What moved in the {window} steps before it (z: change over the std of those steps; "
            f"r: with {_t(ep['metric'])} over the window):",
            "",
            "| metric | before | at alert | z | r | moved with it |",
            "|---|---:|---:|---:|---:|:---:|",
        ]
        for m, row in movers.head(8).iterrows():
            out.append(
                f"| {_t(m)} | {_fmt(row['before'])} | {_fmt(row['at_alert'])} | {_z(row['z'])} "
                f"| {_r(row['r_with_alert_metric'])} | {'yes' if row['moved_with'] else ''} |"
            )
        smp = analysis.alert_samples(r, ep)
        out.append("")
        if len(smp):
            out += [f"Samples at step {int(smp['step'].iloc[0])}:", ""]
            out += [f"- {_t(_sample_line(s))}" for s in smp.to_dict("records")]
        else:
            out.append("No samples saved near this step.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _r(v: float) -> str:
    return "-" if v != v else f"{v:+.2f}"


def _z(v: float) -> str:
    if v != v:
        return "-"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:+.1f}"


# -- one HTML file -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{color:#666;font-size:.85em}
.critical{color:#b00}.warning{color:#b60}pre{background:#f6f6f6;padding:.4em .6em;white-space:pre-wrap;
overflow-wrap:anywhere;font-size:.85em}.muted{color:#666}
"""


def _e(v) -> str:
    """Run text for HTML: escaped (quotes too), control characters shown, never acted on."""
    return html.escape(safe_text(str(v)), quote=True)


def _img(p: Plot, data: bytes) -> str:
    attrs = f'class="{p.section}"' + (f' data-metric="{_e(p.metric)}"' if p.metric else "")
    attrs += f' data-run="{_e(p.run)}"' if p.run else ""
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure {attrs}><img alt="{_e(p.title)}" src="{src}"><figcaption>{_e(p.title)}</figcaption></figure>'


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(
    runs: list[Run], span: int | None = None, window: int = analysis.WINDOW, rendered: list[Plot] | None = None
) -> str:
    """The whole analysis as one HTML file: figures embedded (base64 PNG), no network fetch.
    `rendered`: the plots of an `export(..., keep=True)` of the same runs, not drawn again."""
    figs: dict[str, list[str]] = {}
    alert_figs: dict[int, str] = {}
    for p in rendered if rendered is not None else plots(runs, span, window):
        tag = _img(p, p.data if p.data is not None else png(p.figure))
        if p.alert is not None:
            alert_figs[p.alert] = tag
        else:
            figs.setdefault(p.section, []).append(tag)
    names = ", ".join(r.name for r in runs)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Stability analysis: {_e(names)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Stability analysis: {_e(names)}</h1>",
        f'<p class="muted">trainerd report, {_e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}</p>',
    ]
    for r in runs:
        out.append(f'<h2 id="run-{_e(_slug(r.name))}">Run {_e(r.name)}</h2>')
        out.append(_table(["", ""], [[_e(k), _e(v)] for k, v in _run_rows(r)]))
    out.append('<h2 id="metrics">Stability metrics</h2>')
    out.append(
        '<p class="muted">Raw (thin) and smoothed (thick); dashed: alert thresholds (orange warning, red '
        "critical); shaded: alert spans; red x: NaN/Inf values.</p>"
    )
    out += figs.get("metric", [])
    out.append('<h2 id="stages">Stages</h2>')
    out += figs.get("stages", []) or ["<p>No stage timings in the step log.</p>"]
    for r in runs:
        if any(c.startswith("stage_s.") for c in r.steps.columns):
            rows = [
                [_e(s), _e(_fmt(x["mean_s"])), f"{100 * x['share']:.1f}%"]
                for s, x in analysis.stage_summary(r).iterrows()
            ]
            out.append(f"<p>{_e(r.name)}:</p>" + _table(["stage", "mean s", "share"], rows, {1, 2}))
    out.append('<h2 id="correlations">Correlations</h2>')
    out.append(
        '<p class="muted">Pearson r of step-to-step changes; lagged: r(lag) = corr(change of a at t, change '
        "of b at t + lag), so a positive best lag means a moves first.</p>"
    )
    for r in runs:
        out += [t for t in figs.get("correlation", []) if f'data-run="{_e(r.name)}"' in t]
        out += [t for t in figs.get("lagged", []) if f'data-run="{_e(r.name)}"' in t]
        ll = analysis.lead_lag(analysis.lagged_correlations(r))
        if len(ll):
            rows = [
                [_e(x.a), _e(x.b), str(x.best_lag), f"{x.r:+.2f}", _e(_fmt(x.r_at_0)), _e(x.leads)]
                for x in ll.itertuples()
            ]
            out.append(_table(["a", "b", "best lag", "r", "r at lag 0", "leads"], rows, {2, 3, 4}))
    out.append('<h2 id="instability">Instability analysis</h2>')
    alerts = alert_list(runs)
    if not alerts:
        out.append("<p>No alert fired.</p>")
    elif len(alerts) > MAX_ALERTS:
        out.append(
            f"<p>The first {MAX_ALERTS} of {len(alerts)} alerts (<code>trainerd report</code> lists them all).</p>"
        )
    for n, (r, _, ep) in enumerate(alerts[:MAX_ALERTS], start=1):
        sev = str(ep["severity"])
        out.append(f'<h3 class="{_e(sev)}" data-rule="{_e(ep["rule"])}">{_e(alert_heading(n, r, ep))}</h3>')
        text = ep["message"] or ep["explanation"]
        if text:
            out.append(f"<p>{_e(text)}</p>")
        if n in alert_figs:
            out.append(alert_figs[n])
        movers = analysis.precursors(r, ep, window)
        rows = [
            [
                _e(m),
                _e(_fmt(x["before"])),
                _e(_fmt(x["at_alert"])),
                _e(_z(x["z"])),
                _e(_r(x["r_with_alert_metric"])),
                "yes" if x["moved_with"] else "",
            ]
            for m, x in movers.head(8).iterrows()
        ]
        out.append(
            f"<p>What moved in the {window} steps before it (z: change over the std of those steps; r: with "
            f"{_e(ep['metric'])} over the window):</p>"
        )
        out.append(_table(["metric", "before", "at alert", "z", "r", "moved with it"], rows, {1, 2, 3, 4}))
        smp = analysis.alert_samples(r, ep)
        if len(smp):
            out.append(f"<p>Samples at step {int(smp['step'].iloc[0])}:</p>")
            rows = [
                [
                    _e(s.get("pick", "")),
                    f"<pre>{_e(s.get('prompt', ''))}</pre>",
                    f"<pre>{_e(s.get('response', ''))}</pre>",
                    _e(_fmt(s.get("reward"))),
                    _e(_fmt(s.get("gold"))),
                    _e(_fmt(s.get("kl"))),
                    _e(s.get("length")),
                ]
                for s in smp.to_dict("records")
            ]
            out.append(_table(["pick", "prompt", "response", "reward", "gold", "kl", "length"], rows, {3, 4, 5, 6}))
        else:
            out.append('<p class="muted">No samples saved near this step.</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
