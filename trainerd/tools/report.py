"""`trainerd report RUN... [--format text|md|json|html] [--plots DIR] [-o FILE]`: an offline stability report.

Reads the run directory only (through `protocol`): run.json, steps.msgpack (or the
steps.jsonl mirror when the framed log is missing), events.jsonl. Never imports torch.

What it says:
- per metric (catalogue order, numeric fields): min, median, max, last, trend over the
  steps (Pearson r of value vs step, shown as an arrow) and NaN / Inf counts;
- the alert timeline from events.jsonl: rule, severity, first step, duration or "open";
- the first step where the run turned unstable (first critical alert, or first
  non-finite value, whichever is earlier);
- correlations between kl, reward_mean, gold_reward_mean, entropy, response_length_mean;
- the stage breakdown from `stage_s` (mean seconds per step and share of the step).
`--format html` and `--plots DIR` add the figures (trainerd/tools/figures.py, the `analysis`
extra): one self-contained HTML file, or PNGs and a Markdown report in DIR. Several RUNs: one
report after the other (JSON: a list); in the figures, overlaid.
"""

from __future__ import annotations

import json
import math
import os
import sys

from protocol import catalogue
from protocol.alerts import DEFAULT_RULES, AlertEngine, load_run_rules
from protocol.events import alert_timeline
from protocol.jsonl import read_jsonl
from protocol.rundir import RunDirError, RunPaths, effective_status, read_events, read_manifest, resolve_run
from protocol.steplog import read_steplog
from protocol.text import safe_text

FORMATS = ("text", "md", "json", "html")
CORR_METRICS = ("kl", "reward_mean", "gold_reward_mean", "entropy", "response_length_mean")
_CORR_SHORT = {
    "kl": "kl",
    "reward_mean": "reward",
    "gold_reward_mean": "gold",
    "entropy": "entropy",
    "response_length_mean": "length",
}
_SKIP_STATS = ("step", "time")  # identity fields: the x axis, not metrics


class ReportError(Exception):
    """A run the report cannot read; one line (run text in it already escaped)."""


# -- loading ---------------------------------------------------------------------------


def load_run(run: str) -> tuple[RunPaths, dict, list[dict], dict, list[dict]]:
    """(paths, manifest, records, source info, events) of a run dir (or a runs dir's latest)."""
    try:
        paths = resolve_run(run)
        manifest = read_manifest(paths)
    except RunDirError as e:
        from adapters.sources import is_kit_run_dir

        if not os.path.exists(run) or is_kit_run_dir(run):  # a damaged kit run says what is wrong
            raise ReportError(str(e)) from None
        return load_adapted(run)  # another framework's run (adapters), or one line naming the formats
    info = {"source": None, "corrupt_frames": 0, "skipped_bytes": 0}
    records: list[dict] = []
    # lexists: a planted link (even a dangling one) is the step log, refused below, never skipped
    try:
        if os.path.lexists(paths.steps):
            records, stats = read_steplog(paths.steps, root=paths.root)
            info.update(source=paths.steps.name, corrupt_frames=stats.corrupt_frames, skipped_bytes=stats.skipped_bytes)
        elif os.path.lexists(paths.steps_jsonl):
            records = read_jsonl(paths.steps_jsonl, root=paths.root)
            info["source"] = paths.steps_jsonl.name
        else:
            raise ReportError(f"{safe_text(paths.root)} has no step log (neither steps.msgpack nor steps.jsonl)")
        records = [r for r in records if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)]
        has_events = os.path.lexists(paths.events)
        events = read_events(paths) if has_events else []
    except OSError as e:  # RunFileError (a FIFO, a link out of the run: refused) or an I/O error
        raise ReportError(str(e) if isinstance(e, RunDirError) else _os_error(e)) from None
    info["events_file"] = has_events
    return paths, manifest, records, info, events


def load_adapted(run: str) -> tuple[RunPaths, dict, list[dict], dict, list[dict]]:
    """A run another framework wrote (TensorBoard dir, veRL file log, mapped JSONL/CSV): its records
    through the alias tables; no events (the alerts are replayed with the default rules)."""
    from adapters.sources import SourceError, detect, not_recognised

    try:
        src = detect(run)
        if src is None:
            raise ReportError(not_recognised(run))
        records = src.read_all()
    except SourceError as e:
        raise ReportError(str(e)) from None
    except OSError as e:
        raise ReportError(_os_error(e)) from None
    manifest = src.manifest()
    info = {"source": src.format, "corrupt_frames": 0, "skipped_bytes": 0, "events_file": False}
    info["adapter"] = manifest["adapter"]
    return RunPaths(src.root), manifest, records, info, []


def _os_error(e: OSError) -> str:
    where = f": {safe_text(e.filename)}" if e.filename is not None else ""
    return f"{e.strerror or type(e).__name__}{where}"


# -- statistics ------------------------------------------------------------------------


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson r, or None with fewer than 3 points or a constant series."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return None
    mx = sum(xs) / n
    my = sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0 or not math.isfinite(sxx * syy):
        return None
    r = sxy / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def _median(sorted_vals: list[float]) -> float:
    n = len(sorted_vals)
    mid = n // 2
    return sorted_vals[mid] if n % 2 else (sorted_vals[mid - 1] + sorted_vals[mid]) / 2


def arrow(r: float | None) -> str:
    """Trend arrow from the Pearson r of value vs step."""
    if r is None:
        return "-"
    if r >= 0.5:
        return "↑"
    if r >= 0.2:
        return "↗"
    if r > -0.2:
        return "→"
    if r > -0.5:
        return "↘"
    return "↓"


def metric_names(records: list[dict]) -> list[str]:
    """Numeric fields present in the records: catalogue order first, then any others sorted."""
    present: set[str] = set()
    for r in records:
        for k, v in r.items():
            if isinstance(k, str) and _num(v) is not None:  # a msgpack map may have other keys
                present.add(k)
    ordered = [m for m in catalogue.numeric_fields() if m in present and m not in _SKIP_STATS]
    extra = sorted(present - set(catalogue.METRICS) - set(_SKIP_STATS))
    return ordered + extra


def metric_stats(records: list[dict], name: str) -> dict:
    steps, vals = [], []
    n = nan = pinf = ninf = 0
    last = None
    for r in records:
        v = _num(r.get(name))
        if v is None:
            continue
        n += 1
        last = v
        if v != v:
            nan += 1
        elif v == math.inf:
            pinf += 1
        elif v == -math.inf:
            ninf += 1
        else:
            steps.append(float(r["step"]))
            vals.append(v)
    s = sorted(vals)
    r = pearson(steps, vals)
    first_bad = next(
        (rec["step"] for rec in records if (v := _num(rec.get(name))) is not None and not math.isfinite(v)), None
    )
    return {
        "count": n,
        "finite": len(vals),
        "nan": nan,
        "inf": pinf,
        "neg_inf": ninf,
        "min": s[0] if s else None,
        "median": _median(s) if s else None,
        "max": s[-1] if s else None,
        "last": last,
        "trend_r": r,
        "trend": arrow(r),
        "first_non_finite_step": first_bad,
    }


def replay_alerts(records: list[dict], rules=DEFAULT_RULES) -> list[dict]:
    """Alert events replayed over the records (runs with no events.jsonl): with the run's own
    rules where it saved them (alerts.json), else the defaults."""
    eng = AlertEngine(rules)
    evs = []
    for r in records:
        for ev, a in eng.update(r):
            evs.append({"event": ev, **a.to_event(ev)})
    return evs


def first_unstable(records: list[dict], timeline: list[dict], fields: list[str]) -> dict | None:
    cands = []
    for ep in timeline:
        if ep["fired_severity"] == "critical" and isinstance(ep["first_step"], int):
            cands.append((ep["first_step"], 0, f"critical alert {ep['rule']} ({ep['metric']})"))
        elif ep["severity"] == "critical" and isinstance(ep["escalated_step"], int):
            cands.append((ep["escalated_step"], 0, f"alert {ep['rule']} escalated to critical ({ep['metric']})"))
    for rec in records:
        bad = [k for k in fields if (v := _num(rec.get(k))) is not None and not math.isfinite(v)]
        if bad:
            vals = ", ".join(f"{k}={_fmt(rec[k])}" for k in bad[:3])
            cands.append((rec["step"], 1, f"non-finite value: {vals}"))
            break
    if not cands:
        return None
    step, _, reason = min(cands)
    return {"step": step, "reason": reason}


def correlations(records: list[dict]) -> dict:
    present = [m for m in CORR_METRICS if any(_num(r.get(m)) is not None for r in records)]
    out: dict[str, dict[str, float | None]] = {}
    for a in present:
        out[a] = {}
        for b in present:
            xs, ys = [], []
            for r in records:
                x, y = _num(r.get(a)), _num(r.get(b))
                if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                    xs.append(x)
                    ys.append(y)
            out[a][b] = pearson(xs, ys)
    return out


def stage_breakdown(records: list[dict]) -> list[dict] | None:
    maps = [
        {k: v for k, v in r["stage_s"].items() if isinstance(k, str)}
        for r in records
        if isinstance(r.get("stage_s"), dict)
    ]
    if not maps:
        return None
    names = [s for s in catalogue.STAGES if any(s in m for m in maps)]
    names += sorted({k for m in maps for k in m} - set(names))
    means = {}
    for s in names:
        vals = [v for m in maps if (v := _num(m.get(s))) is not None and math.isfinite(v)]
        means[s] = sum(vals) / len(vals) if vals else 0.0
    shares = catalogue.stage_shares(means)  # the one definition of a stage's share
    if not any(shares.values()):
        return [{"stage": s, "mean_s": means[s], "share": None} for s in names]
    return [{"stage": s, "mean_s": means[s], "share": shares[s]} for s in names]


def run_rules(paths: RunPaths, info: dict) -> tuple[tuple, str | None]:
    """(rules, note) a run is evaluated with: its saved rules (alerts.json), else the defaults
    (always for another framework's run); the note says why the saved ones were not used."""
    return load_run_rules(paths.root) if not info.get("adapter") else (DEFAULT_RULES, None)


def alert_events(paths: RunPaths, records: list[dict], info: dict, events: list[dict]) -> tuple[list[dict], str]:
    """(alert events, where they come from): events.jsonl's, else replayed over the records."""
    if info["events_file"]:
        return events, "events.jsonl"
    rules, note = run_rules(paths, info)
    saved = rules is not DEFAULT_RULES
    alert_source = f"replayed with the {'run' if saved else 'default'} rules (no events.jsonl)"
    return replay_alerts(records, rules), alert_source + (f"; {note}" if note else "")


def injection_of(manifest: dict) -> str | None:
    """The fault injected into a run (`kl_blowup@5`), from its manifest; None for a clean run."""
    cfg = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    inj = manifest.get("injection") or cfg.get("inject")
    if isinstance(inj, dict):
        inj = inj.get("spec") or f"{inj.get('kind')}@{inj.get('step')}"
    return str(inj) if inj not in ({}, "", None) else None


def build(run: str) -> dict:
    paths, manifest, records, info, events = load_run(run)
    records.sort(key=lambda r: r["step"])
    last_step = records[-1]["step"] if records else None
    fields = metric_names(records)
    events, alert_source = alert_events(paths, records, info, events)
    timeline = alert_timeline(events, last_step)
    samples, samples_note = load_samples(paths) if not info.get("adapter") else ([], None)
    for ep in timeline:
        ep["samples"] = samples_near(samples, ep.get("fired_step"))
    return {
        "run": str(paths.root),
        "run_id": paths.run_id,
        "status": effective_status(manifest, paths),
        "seed": manifest.get("seed"),
        "injection": injection_of(manifest),
        "steps": len(records),
        "first_step": records[0]["step"] if records else None,
        "last_step": last_step,
        "step_log": info,
        "metrics": {m: metric_stats(records, m) for m in fields},
        "alerts": timeline,
        "alert_source": alert_source,
        "first_unstable": first_unstable(records, timeline, fields),
        "correlations": correlations(records),
        "stages": stage_breakdown(records),
        "samples_note": samples_note,
    }


MAX_SAMPLES = 100_000  # lines of samples.jsonl read at most (a report, not an archive)


def load_samples(paths: RunPaths) -> tuple[list[dict], str | None]:
    """The run's samples.jsonl (the responses behind the numbers); ([], why) if unreadable."""
    if not os.path.lexists(paths.samples):
        return [], None
    try:
        rows = read_jsonl(paths.samples, root=paths.root)
    except OSError as e:  # refused (a link, a FIFO) or unreadable: the report goes on without
        return [], str(e) if isinstance(e, RunDirError) else _os_error(e)
    return [r for r in rows[-MAX_SAMPLES:] if isinstance(r.get("step"), int)], None


def samples_near(samples: list[dict], step: object, window: int = 10) -> list[dict]:
    """The samples of the step nearest to `step` (within `window` steps): written at the
    alert's own step by the kit's trainer, so usually exactly it."""
    if not isinstance(step, int) or not samples:
        return []
    near = [s for s in samples if abs(s["step"] - step) <= window]
    if not near:
        return []
    best = min(near, key=lambda s: (abs(s["step"] - step), s["step"]))["step"]
    return [s for s in near if s["step"] == best]


# -- rendering -------------------------------------------------------------------------


def _fmt(v, width: int | None = None) -> str:
    if v is None:
        s = "-"
    elif isinstance(v, bool):
        s = str(v)
    elif isinstance(v, int):
        s = str(v) if abs(v) < 10**9 else f"{v:.3g}"
    elif isinstance(v, float):
        if v != v:
            s = "NaN"
        elif math.isinf(v):
            s = "Inf" if v > 0 else "-Inf"
        elif v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            s = f"{v:.2e}"
        else:
            s = f"{v:.4g}"
    else:
        s = str(v)
    return s.rjust(width) if width else s


def _nonfinite(st: dict) -> str:
    parts = []
    if st["nan"]:
        parts.append(f"{st['nan']} NaN")
    if st["inf"] or st["neg_inf"]:
        parts.append(f"{st['inf'] + st['neg_inf']} Inf")
    return " ".join(parts) or "0"


def _sample_line(s: dict) -> str:
    """'step 22 best: "dkag" -> "aaaab" reward +1.31 gold -0.40 kl 0.52 len 6'."""
    return (
        f"step {s.get('step')} {s.get('pick', '?')}: {str(s.get('prompt', ''))[:60]!r} -> "
        f"{str(s.get('response', ''))[:120]!r} reward {_fmt(s.get('reward'))} gold {_fmt(s.get('gold'))} "
        f"kl {_fmt(s.get('kl'))} len {s.get('length')}"
    )


def _alert_when(ep: dict) -> str:
    if ep["open"]:
        d = ep["duration_steps"]
        return f"open ({d} steps)" if d is not None else "open"
    return f"{ep['duration_steps']} steps, cleared {ep['cleared_step']}"


def _header(d: dict) -> list[tuple[str, str]]:
    rows = [("run", d["run"])]
    adapter = d["step_log"].get("adapter")
    if adapter:  # another framework's run: which, and the catalogue fields it does not log
        missing = adapter.get("missing") or []
        rows.append(("framework", f"{adapter.get('label')} ({adapter.get('format')})"))
        rows.append(("lacks", ", ".join(missing) if missing else "nothing"))
    rows += [
        ("status", str(d["status"])),
        ("steps", f"{d['steps']} ({d['first_step']}..{d['last_step']})" if d["steps"] else "0 (no steps yet)"),
    ]
    if d["seed"] is not None:
        rows.append(("seed", str(d["seed"])))
    if d["injection"]:
        inj = d["injection"]
        rows.append(("injection", str(inj)))
    sl = d["step_log"]
    if sl["corrupt_frames"]:
        rows.append(("step log", f"{sl['corrupt_frames']} corrupt frame(s) skipped"))
    fu = d["first_unstable"]
    rows.append(("unstable from", f"step {fu['step']}: {fu['reason']}" if fu else "never (stable)"))
    return rows


def _wrap(text: str, width: int, indent: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent) or [indent]


def terminal_safe(v):
    """`v` (the report's dict) with every string in it, keys included, escaped for a terminal:
    run ids, statuses, metric and stage names, alert rules and explanations all come from the
    run dir, and an ESC sequence in them must show, not act."""
    if isinstance(v, str):
        return safe_text(v)
    if isinstance(v, dict):
        return {terminal_safe(k) if isinstance(k, str) else k: terminal_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [terminal_safe(x) for x in v]
    return v


def render_text(d: dict) -> str:
    d = terminal_safe(d)
    out: list[str] = []
    title = f"Stability report: {d['run_id']}"
    out += [title, "=" * min(len(title), 79)]
    for k, v in _header(d):
        lines = _wrap(v, 79 - 15, "")
        out.append(f"{k + ':':<14} {lines[0]}")
        out += [" " * 15 + ln for ln in lines[1:]]
    out.append("")
    out.append("Metrics")
    hdr = f"{'metric':<22}{'min':>10}{'median':>10}{'max':>10}{'last':>10} tr {'non-fin':>8}"
    out += [hdr, "-" * len(hdr)]
    for name, st in d["metrics"].items():
        out.append(
            f"{name[:21]:<22}{_fmt(st['min'], 10)}{_fmt(st['median'], 10)}{_fmt(st['max'], 10)}"
            f"{_fmt(st['last'], 10)}  {st['trend']}{_nonfinite(st):>9}"
        )
    out.append("tr = trend, Pearson r of value vs step: ↑ >=.5 ↗ >=.2 → |r|<.2 ↘ <=-.2 ↓ <=-.5")
    out.append("")
    out.append(f"Alerts ({d['alert_source']})")
    if not d["alerts"]:
        out.append("  none fired")
    for ep in d["alerts"]:
        sev = str(ep["severity"] or "?")
        esc = f" (escalated at {ep['escalated_step']})" if ep["escalated_step"] is not None else ""
        out.append(f"  {sev.upper():<8} {ep['rule']:<24} step {ep['first_step']}: {_alert_when(ep)}{esc}"[:79])
        if ep.get("message"):  # what the rule really compared (trends, median and factor ...)
            msg = str(ep["message"])
            if ep["explanation"] and msg.endswith(f" - {ep['explanation']}"):
                msg = msg[: -len(f" - {ep['explanation']}")]  # the explanation follows on its own
            out += _wrap(msg, 79, " " * 11)
        else:
            out.append(f"{'':11}{ep['metric']}={_fmt(ep['value'])} (threshold {_fmt(ep['threshold'])})")
        if ep["explanation"]:
            out += _wrap(str(ep["explanation"]), 79, " " * 11)
        for s in ep.get("samples") or []:
            out += _wrap(_sample_line(s), 79, " " * 13)
    out.append("")
    corr = d["correlations"]
    out.append("Correlations (Pearson r over finite steps)")
    if len(corr) < 2:
        out.append("  not enough metrics")
    else:
        names = list(corr)
        out.append(f"{'':>10}" + "".join(f"{_CORR_SHORT[n]:>9}" for n in names))
        for a in names:
            cells = "".join(f"{'-' if corr[a][b] is None else f'{corr[a][b]:+.2f}':>9}" for b in names)
            out.append(f"{_CORR_SHORT[a]:>10}{cells}")
    out.append("")
    out.append("Stages (mean per step)")
    if not d["stages"]:
        out.append("  no stage timings in the step log")
    else:
        out.append(f"  {'stage':<16}{'mean s':>10}{'share':>8}")
        for s in d["stages"]:
            share = "-" if s["share"] is None else f"{100 * s['share']:.1f}%"
            bar = "#" * int(round(30 * s["share"])) if s["share"] else ""
            out.append(f"  {s['stage']:<16}{_fmt(s['mean_s'], 10)}{share:>8}  {bar}"[:79])
    return "\n".join(out) + "\n"


def render_md(d: dict) -> str:
    d = terminal_safe(d)
    out = [f"# Stability report: {d['run_id']}", ""]
    for k, v in _header(d):
        out.append(f"- **{k}**: {v}")
    out += [
        "",
        "## Metrics",
        "",
        "| metric | min | median | max | last | trend | r | NaN | Inf |",
        "|---|---:|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for name, st in d["metrics"].items():
        r = "-" if st["trend_r"] is None else f"{st['trend_r']:+.2f}"
        out.append(
            f"| {name} | {_fmt(st['min'])} | {_fmt(st['median'])} | {_fmt(st['max'])} | {_fmt(st['last'])} "
            f"| {st['trend']} | {r} | {st['nan']} | {st['inf'] + st['neg_inf']} |"
        )
    out += ["", f"## Alerts ({d['alert_source']})", ""]
    if not d["alerts"]:
        out.append("None fired.")
    else:
        out += [
            "| severity | rule | metric | value | threshold | first step | duration | explanation |",
            "|---|---|---|---:|---:|---:|---|---|",
        ]
        for ep in d["alerts"]:
            expl = str(ep["explanation"] or "").replace("|", "\\|")
            out.append(
                f"| {ep['severity']} | {ep['rule']} | {ep['metric']} | {_fmt(ep['value'])} "
                f"| {_fmt(ep['threshold'])} | {ep['first_step']} | {_alert_when(ep)} | {expl} |"
            )
        with_samples = [ep for ep in d["alerts"] if ep.get("samples")]
        for ep in with_samples:
            out += ["", f"Samples at step {ep['samples'][0]['step']} ({ep['rule']}):", ""]
            out += [f"- {_sample_line(s)}".replace("|", "\\|") for s in ep["samples"]]
    out += ["", "## Correlations", ""]
    corr = d["correlations"]
    if len(corr) < 2:
        out.append("Not enough metrics.")
    else:
        names = list(corr)
        out.append("| | " + " | ".join(names) + " |")
        out.append("|---|" + "---:|" * len(names))
        for a in names:
            out.append(
                f"| {a} | " + " | ".join("-" if corr[a][b] is None else f"{corr[a][b]:+.2f}" for b in names) + " |"
            )
    out += ["", "## Stages", ""]
    if not d["stages"]:
        out.append("No stage timings in the step log.")
    else:
        out += ["| stage | mean s | share |", "|---|---:|---:|"]
        for s in d["stages"]:
            share = "-" if s["share"] is None else f"{100 * s['share']:.1f}%"
            out.append(f"| {s['stage']} | {_fmt(s['mean_s'])} | {share} |")
    return "\n".join(out) + "\n"


def _json_safe(v):
    """Non-finite floats as the kit's JSONL strings ("NaN", "Infinity", "-Infinity")."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def render_json(d: dict) -> str:
    # ASCII only: every control character (C0, C1, bidi) in run text is a \\u escape
    return json.dumps(_json_safe(d), indent=2, allow_nan=False) + "\n"


ANALYSIS_EXTRA = "pip install 'rlhf-kit[analysis]'"


def _say(msg: str) -> int:
    print(f"trainerd report: {safe_text(msg)}", file=sys.stderr)
    return 2


def run(run, fmt: str = "text", plots: str | None = None, output: str | None = None) -> int:
    """Print the report of RUN (a path, or a list of paths: several runs) in `fmt`; with `plots`,
    also write the figures as PNG and a Markdown report to that folder; with `output`, write the
    report to that file instead of stdout. Exit code (2: a run, format or path it cannot use)."""
    runs = [str(run)] if isinstance(run, (str, os.PathLike)) else [str(r) for r in run]
    if fmt not in FORMATS:
        return _say(f"unknown format {repr(fmt)} (choose {', '.join(FORMATS)})")
    if not runs:
        return _say("no run given")
    if fmt == "html" and output is None and sys.stdout.isatty():
        return _say("--format html writes a file: give -o FILE.html (or redirect stdout)")
    if output is not None:  # a path it cannot write is said before the work, not after
        try:
            with open(output, "a", encoding="utf-8"):
                pass
        except OSError as e:
            return _say(f"cannot write the report: {_os_error(e)}")
    try:
        if fmt == "html" or plots is not None:
            text = _with_figures(runs, fmt, plots)
        else:
            ds = [build(r) for r in runs]
            if fmt == "json":
                text = render_json(ds[0]) if len(ds) == 1 else json.dumps([_json_safe(d) for d in ds], indent=2) + "\n"
            else:
                text = "\n".join({"text": render_text, "md": render_md}[fmt](d) for d in ds)
    except ReportError as e:
        return _say(str(e))
    if output is not None:
        try:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            return _say(f"cannot write the report: {_os_error(e)}")
        return 0
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `trainerd report RUN | head`
        return 0
    return 0


def _with_figures(runs: list[str], fmt: str, plots: str | None) -> str:
    """The report of runs that needs figures (trainerd.tools.figures, the `analysis` extra)."""
    try:
        from trainerd.tools import analysis, figures
    except ModuleNotFoundError as e:
        raise ReportError(
            f"--format html and --plots need pandas and matplotlib ({e.name} is not installed): {ANALYSIS_EXTRA}"
        ) from None
    loaded = analysis.load_runs(runs)
    done = None
    if plots is not None:
        done = figures.export(loaded, plots, keep=fmt == "html")
        print(f"trainerd report: {len(done.files)} figures and report.md in {safe_text(done.folder)}", file=sys.stderr)
    if fmt == "html":
        return figures.render_html(loaded, rendered=done.plots if done else None)
    if fmt == "json":
        ds = [build(r) for r in runs]
        return render_json(ds[0]) if len(ds) == 1 else json.dumps([_json_safe(d) for d in ds], indent=2) + "\n"
    return "\n".join({"text": render_text, "md": render_md}[fmt](build(r)) for r in runs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else "runs/latest", sys.argv[2] if len(sys.argv) > 2 else "text"))
