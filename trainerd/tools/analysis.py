"""Offline analysis: runs as pandas frames, and the numbers behind the stability figures.

`load(RUN)` reads a run (a kit run dir, a runs dir's latest, or another framework's run that
`adapters.sources.detect` recognises) through `protocol` and `trainerd.tools.report`, so a
corrupt frame is skipped and counted, never raised, and the alerts are the report's: the run's
events.jsonl, else replayed with its saved rules (the defaults for other frameworks). It gives a
`Run`: per-step metrics (`steps`, one row per step, maps flattened as `stage_s.rollout`), the
non-finite values (`nonfinite`), `events`, alert episodes (`alerts`) and `samples` as frames.
`load_runs` reads several for comparison (`stack`, `compare` overlay them).

The rest are the computations the stability notebook (notebooks/stability_dashboard.ipynb),
`trainerd report --format html` and `--plots` show (figures.py draws them): smoothing, the
stage breakdown, correlations of step-to-step changes, lagged correlations of KL, entropy,
reward and gold reward, and per alert what moved before it and the samples at its step.

Needs the `analysis` extra (pandas; numpy comes with it). The monitor never imports this.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protocol import catalogue
from protocol.alerts import Rule, thresholds_for
from protocol.events import alert_timeline
from protocol.rundir import RunDirError, effective_status
from protocol.text import safe_text
from trainerd.tools import report
from trainerd.tools.report import ReportError

EXTRA = "pip install 'rlhf-kit[analysis]'"

# The groups of the catalogue whose float metrics say whether training is stable (throughput,
# memory and stages are the profiler's); kl_target is drawn as the kl chart's target line, and a
# variance says nothing its standard deviation does not.
STABILITY_GROUPS = ("kl", "policy", "value", "reward", "advantage", "rollout")
_NOT_STABILITY = {"kl_target", "reward_var", "advantage_var"}
# Lagged correlations: the four series whose lead and lag tell a story (KL up before reward?
# gold reward falling after the proxy rises?).
LAGGED = ("kl", "entropy", "reward_mean", "gold_reward_mean")
WINDOW = 20  # steps looked at before an alert


class AnalysisError(ReportError):
    """A run the analysis cannot read, or a missing extra: one line."""


def stability_metrics(columns: Any, rules: tuple[Rule, ...] | list[Rule] = ()) -> list[str]:
    """The stability metrics among `columns`, catalogue order: the float metrics of the KL,
    policy, value, reward, advantage and rollout groups, then any other field an alert rule reads
    (another framework's `kl_seq`, say)."""
    cols = set(columns)
    out = [
        m.name
        for m in catalogue.METRICS.values()
        if m.group in STABILITY_GROUPS and m.kind == "float" and m.name not in _NOT_STABILITY and m.name in cols
    ]
    for r in rules:
        for name in (r.metric, *r.metrics):
            if name in cols and name not in out and name not in catalogue.METRICS:
                out.append(name)
    return out


# -- the loader ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run as frames. `steps` is indexed by step; NaN in it is a NaN the run logged or a
    metric missing at that step: `nonfinite` lists the logged NaN and Inf values."""

    name: str  # the run id (made unique among compared runs)
    path: str
    status: str
    manifest: dict
    steps: pd.DataFrame
    nonfinite: pd.DataFrame  # step, metric, value ("NaN", "Inf", "-Inf")
    events: pd.DataFrame
    alerts: pd.DataFrame  # one row per alert episode (protocol.events.alert_timeline), end_step added
    samples: pd.DataFrame
    corrupt_frames: int  # step-log frames skipped as corrupt (crc mismatch, bad length)
    skipped_bytes: int
    source: str | None  # steps.msgpack, steps.jsonl, or another framework's format
    alert_source: str
    rules: tuple[Rule, ...]
    injection: str | None = None
    first_unstable: dict | None = None  # {"step", "reason"}: first critical alert or non-finite value
    framework: str | None = None  # another framework's label, e.g. "TRL (TensorBoard)"
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """Stability metrics this run logged (at least one value, finite or not)."""
        present = [c for c in self.steps.columns if self.steps[c].notna().any()]
        present += list(self.nonfinite["metric"].unique()) if len(self.nonfinite) else []
        return stability_metrics(present, self.rules)

    @property
    def last_step(self) -> int | None:
        return int(self.steps.index.max()) if len(self.steps) else None

    def thresholds(self, metric: str) -> list[tuple[str, str, float]]:
        """(kind, severity, threshold) of the run's single-metric rules on `metric`."""
        return thresholds_for(metric, self.rules)

    def finite(self, metric: str) -> pd.Series:
        """The metric's values with NaN and Inf dropped (index: step)."""
        s = self.steps[metric] if metric in self.steps else pd.Series(dtype=float)
        return s[np.isfinite(s)]

    def __repr__(self) -> str:
        return (
            f"Run({self.name!r}, {self.status}, {len(self.steps)} steps, {len(self.alerts)} alerts, "
            f"{self.corrupt_frames} corrupt frames)"
        )


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:  # an int too large for a float
        return None


def _nonfinite_name(v: float) -> str:
    return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")


def records_frame(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, nonfinite) of step records: numbers only (maps flattened `name.key`), one row per
    step (a repeated step keeps its last record), sorted by step."""
    cols: dict[str, list[float | None]] = {}
    steps: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for r in records:
        step = r.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= catalogue.INT_MAX:
            continue  # not a step an index can hold (the report says what it is)
        steps.append(step)
        flat: dict[str, float] = {}
        for k, v in r.items():
            if not isinstance(k, str) or k == "step":
                continue
            if isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(kk, str) and (f := _number(vv)) is not None:
                        flat[f"{k}.{kk}"] = f
            elif (f := _number(v)) is not None:
                flat[k] = f
        n = len(steps) - 1
        for k, f in flat.items():
            col = cols.get(k)
            if col is None:
                col = cols[k] = [None] * n
            col.append(f)
            if not math.isfinite(f):
                bad.append((step, k, _nonfinite_name(f)))
        for col in cols.values():
            if len(col) <= n:
                col.append(None)
    df = pd.DataFrame({k: np.array([np.nan if x is None else x for x in v], dtype=float) for k, v in cols.items()})
    df.index = pd.Index(np.array(steps, dtype=np.int64), name="step")
    if len(df):
        df = df[~df.index.duplicated(keep="last")].sort_index()
    nf = pd.DataFrame(bad, columns=["step", "metric", "value"]).drop_duplicates(["step", "metric"], keep="last")
    return df, nf.reset_index(drop=True)


def load(run: str | Path, name: str | None = None) -> Run:
    """One run as frames (see `Run`). AnalysisError, one line, for a path that is not a run."""
    run = str(run)
    try:
        paths, manifest, records, info, events = report.load_run(run)
    except (ReportError, RunDirError) as e:  # RunDirError: a file of it refused (a link, a FIFO)
        raise AnalysisError(str(e)) from None
    records.sort(key=lambda r: r["step"])
    steps, nonfinite = records_frame(records)
    rules, note = report.run_rules(paths, info)
    events, alert_source = report.alert_events(paths, records, info, events)
    last = int(steps.index.max()) if len(steps) else None
    timeline = alert_timeline(events, last)
    alerts = pd.DataFrame(
        timeline,
        columns=[
            "rule",
            "metric",
            "severity",
            "fired_severity",
            "first_step",
            "fired_step",
            "value",
            "threshold",
            "escalated_step",
            "cleared_step",
            "duration_steps",
            "open",
            "message",
            "explanation",
        ],
    )
    alerts["end_step"] = [
        step_of(ep["cleared_step"]) if not ep["open"] and step_of(ep["cleared_step"]) is not None else last
        for ep in timeline
    ]
    notes = [note] if note else []
    samples: list[dict] = []
    if not info.get("adapter"):
        samples, samples_note = report.load_samples(paths)
        if samples_note:
            notes.append(f"samples.jsonl not read: {samples_note}")
    adapter = info.get("adapter") or {}
    return Run(
        name=name or paths.run_id,
        path=str(paths.root),
        status=str(effective_status(manifest, paths)) if not adapter else "adapted",
        manifest=manifest,
        steps=steps,
        nonfinite=nonfinite,
        events=pd.DataFrame([e for e in events if isinstance(e, dict)]),
        alerts=alerts,
        samples=pd.DataFrame(samples),
        corrupt_frames=int(info.get("corrupt_frames") or 0),
        skipped_bytes=int(info.get("skipped_bytes") or 0),
        source=info.get("source"),
        alert_source=alert_source,
        rules=tuple(rules),
        injection=report.injection_of(manifest),
        first_unstable=report.first_unstable(records, timeline, report.metric_names(records)),
        framework=f"{adapter.get('label')} ({adapter.get('format')})" if adapter else None,
        notes=notes,
    )


def load_runs(runs: Any) -> list[Run]:
    """Several runs (a path or a list of paths), named by run id, made unique (`clean`, `clean#2`)."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    out: list[Run] = []
    seen: dict[str, int] = {}
    for r in runs:
        loaded = load(r)
        n = seen[loaded.name] = seen.get(loaded.name, 0) + 1
        if n > 1:
            loaded.name = f"{loaded.name}#{n}"
        out.append(loaded)
    if not out:
        raise AnalysisError("no run given")
    return out


def stack(runs: list[Run]) -> pd.DataFrame:
    """Every run's steps in one long frame: columns run, step and the metrics."""
    return pd.concat([r.steps.reset_index().assign(run=r.name) for r in runs], ignore_index=True)


def compare(runs: list[Run], metric: str) -> pd.DataFrame:
    """One metric of several runs side by side: index step, one column per run."""
    return pd.DataFrame({r.name: r.steps[metric] for r in runs if metric in r.steps})


def metrics_of(runs: list[Run]) -> list[str]:
    """The stability metrics any of the runs logged, catalogue order."""
    names: list[str] = []
    for r in runs:
        names += [m for m in r.metrics if m not in names]
    rules = [rule for r in runs for rule in r.rules]
    return stability_metrics(names, rules)


def summary(runs: list[Run]) -> pd.DataFrame:
    """One row per run: status, steps, corrupt frames, alerts, first unstable step."""
    rows = []
    for r in runs:
        fu = r.first_unstable
        rows.append(
            {
                "run": r.name,
                "status": r.status,
                "framework": r.framework or "kit",
                "injection": r.injection,
                "steps": len(r.steps),
                "last_step": r.last_step,
                "corrupt_frames": r.corrupt_frames,
                "alerts": len(r.alerts),
                "critical": int((r.alerts["severity"] == "critical").sum()) if len(r.alerts) else 0,
                "unstable_from": fu["step"] if fu else None,
                "unstable_because": fu["reason"] if fu else None,
            }
        )
    return pd.DataFrame(rows).set_index("run")


def _isna(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def step_of(v: object) -> int | None:
    """A step from an event (first_step, cleared_step ...), or None for anything else a damaged
    events.jsonl may hold there (a string, a bool, NaN, a float that is not a whole number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    f = float(v)
    return int(f) if math.isfinite(f) and f == int(f) and abs(f) <= catalogue.INT_MAX else None


# -- computations ----------------------------------------------------------------------------------


def default_span(n_steps: int) -> int:
    """EMA span for `n_steps` points: about a twentieth of the run, 3 to 50 steps."""
    return max(3, min(50, n_steps // 20))


def smooth(series: pd.Series, span: int | None = None) -> pd.Series:
    """Exponential moving average over the finite values (NaN and Inf left out, not spread)."""
    s = series.where(np.isfinite(series))
    return s.ewm(span=span or default_span(int(s.notna().sum())), ignore_na=True).mean().where(s.notna())


def stages(run: Run) -> pd.DataFrame:
    """Seconds per stage per step (index step, one column per stage, the profiler's order)."""
    cols = [c for c in run.steps.columns if c.startswith("stage_s.")]
    names = [c.split(".", 1)[1] for c in cols]
    order = [s for s in catalogue.STAGES if s in names] + sorted(set(names) - set(catalogue.STAGES))
    df = run.steps[[f"stage_s.{s}" for s in order]].copy()
    df.columns = order
    return df


def stage_summary(run: Run) -> pd.DataFrame:
    """Mean seconds per step and share of the step, per stage (catalogue.stage_shares)."""
    df = stages(run)
    means = {s: float(v) if math.isfinite(v) else 0.0 for s, v in df.where(np.isfinite(df)).mean().items()}
    shares = catalogue.stage_shares(means)
    return pd.DataFrame({"mean_s": means, "share": shares}).rename_axis("stage")


def changes(run: Run, metrics: list[str]) -> pd.DataFrame:
    """Step-to-step changes of the finite values (a trend shared by two metrics says little
    about whether they move together; their changes do)."""
    df = run.steps[[m for m in metrics if m in run.steps]]
    return df.where(np.isfinite(df)).diff()


def correlations(run: Run, metrics: list[str] | None = None, steps: slice | None = None) -> pd.DataFrame:
    """Pearson r between the step-to-step changes of the metrics (constant ones left out)."""
    d = changes(run, metrics or run.metrics)
    if steps is not None:
        d = d.loc[steps]
    d = d.loc[:, d.std() > 0]
    return d.corr(min_periods=3)


def lagged_correlations(run: Run, metrics: tuple[str, ...] = LAGGED, max_lag: int = 10) -> pd.DataFrame:
    """r(lag) = corr(change of a at t, change of b at t + lag) for each pair a < b of `metrics`
    and lag in -max_lag..max_lag: a positive best lag means a moves first. Columns a, b, lag, r, n."""
    present = [m for m in metrics if m in run.steps and run.finite(m).std() > 0]
    d = changes(run, present)
    rows = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            for lag in range(-max_lag, max_lag + 1):
                x, y = d[a], d[b].shift(-lag)
                ok = x.notna() & y.notna()
                n = int(ok.sum())
                r = x[ok].corr(y[ok]) if n >= 3 else math.nan
                rows.append({"a": a, "b": b, "lag": lag, "r": r, "n": n})
    return pd.DataFrame(rows, columns=["a", "b", "lag", "r", "n"])


def lead_lag(lagged: pd.DataFrame) -> pd.DataFrame:
    """Per pair: the lag of the strongest correlation, and which metric leads."""
    rows = []
    for (a, b), g in lagged.groupby(["a", "b"], sort=False):
        g = g.dropna(subset=["r"])
        if g.empty:
            continue
        best = g.loc[g["r"].abs().idxmax()]
        lag = int(best["lag"])
        lead = a if lag > 0 else b if lag < 0 else "together"
        rows.append({"a": a, "b": b, "best_lag": lag, "r": float(best["r"]), "r_at_0": _r_at(g, 0), "leads": lead})
    return pd.DataFrame(rows, columns=["a", "b", "best_lag", "r", "r_at_0", "leads"])


def _r_at(g: pd.DataFrame, lag: int) -> float:
    hit = g[g["lag"] == lag]["r"]
    return float(hit.iloc[0]) if len(hit) else math.nan


def precursors(run: Run, alert: Any, window: int = WINDOW) -> pd.DataFrame:
    """What moved before an alert (a row of `run.alerts`): per stability metric, its mean over
    the `window` steps before the alert's first step, its value at that step, the change, how
    far outside its recent range it is (z: change over the std of those steps), and its
    correlation with the alert's metric over the window and the alert step. Sorted by |z|:
    the top rows are what moved; `moved_with` marks those that moved with the alert's metric."""
    first = step_of(alert["first_step"])
    if first is None:
        raise AnalysisError(f"alert {safe_text(str(alert['rule']))} has no first step")
    am = alert["metric"]
    cols = run.metrics
    frame = run.steps.loc[(run.steps.index >= first - window) & (run.steps.index <= first)]
    x = frame.reindex(columns=cols).to_numpy(dtype=float)
    x = np.where(np.isfinite(x), x, np.nan)  # the statistics see finite values only
    steps = frame.index.to_numpy()
    before = x[steps < first]
    hit = np.flatnonzero(steps == first)
    raw_at = frame.reindex(columns=cols).to_numpy(dtype=float)[hit[0]] if len(hit) else np.full(len(cols), np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, said as "-"
        base = np.nanmean(before, axis=0) if len(before) else np.full(len(cols), np.nan)
        scale = np.nanstd(before, axis=0, ddof=1) if len(before) >= 2 else np.full(len(cols), np.nan)
    rows = []
    ref = x[:, cols.index(am)] if am in cols else None
    for j, m in enumerate(cols):
        at, b, sd = float(raw_at[j]), float(base[j]), float(scale[j])
        change = at - b
        if math.isnan(at):  # a NaN the run logged at the alert's step is as far out as it gets
            z = math.inf if ((run.nonfinite["step"] == first) & (run.nonfinite["metric"] == m)).any() else math.nan
        elif math.isinf(at):
            z = math.copysign(math.inf, at)
        elif math.isfinite(sd) and sd > 1e-9 * max(1.0, abs(b)):
            z = change / sd
        elif math.isnan(change) or abs(change) <= 1e-9 * max(1.0, abs(b)):  # constant (to rounding)
            z = 0.0
        else:  # flat before, then a step: as far out as it gets
            z = math.copysign(math.inf, change)
        r = math.nan
        if ref is not None and m != am:
            ok = np.isfinite(x[:, j]) & np.isfinite(ref)
            if ok.sum() >= 3 and np.std(x[ok, j]) > 0 and np.std(ref[ok]) > 0:
                r = float(np.corrcoef(x[ok, j], ref[ok])[0, 1])
        rows.append({"metric": m, "before": b, "at_alert": at, "change": change, "z": z, "r_with_alert_metric": r})
    df = pd.DataFrame(rows, columns=["metric", "before", "at_alert", "change", "z", "r_with_alert_metric"]).set_index(
        "metric"
    )
    df["moved_with"] = (df["z"].abs() >= 2) & ((df["r_with_alert_metric"].abs() >= 0.7) | (df.index == am))
    return df.iloc[np.argsort(-df["z"].abs().fillna(-1).to_numpy(), kind="stable")]


def alert_samples(run: Run, alert: Any) -> pd.DataFrame:
    """The samples the run saved at the alert's step (or the nearest step within 10)."""
    if run.samples.empty:
        return run.samples
    step = step_of(alert["fired_step"])
    step = step if step is not None else step_of(alert["first_step"])
    recs = run.samples.to_dict("records")
    near = report.samples_near(recs, step)
    return pd.DataFrame(near, columns=run.samples.columns)
