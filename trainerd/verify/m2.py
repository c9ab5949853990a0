"""`trainerd verify m2 [RUN] [--json]`: the profiler's artifacts are there and add up.

Checks, in order (each one is reported; a failure lists which file or step and why in
its "problems"):

1. `chrome_trace`  profile/chrome_trace.json exists and is a Chrome trace that parses as
                   strict JSON (no NaN/Infinity: Perfetto rejects them), every complete
                   event has a numeric ts and dur.
2. `op_stats`      profile/op_stats.csv exists, parses, has the operator columns, at least
                   one row, calls >= 1 and self time <= total time on every row.
3. `summary`       profile/summary.csv exists, parses, one row per stage of STAGES.
4. `stage_ranges`  the trace holds a record_function range for every stage, and every
                   profiled step (ProfilerStep#N range) holds one of each. `other` is
                   exempt unless the trace has an `other` range at all: it is the
                   remainder of the step (the time between and around the named stages),
                   which is not one contiguous region a range could wrap. If the trainer
                   does wrap something as `other`, it must do so in every profiled step.
5. `stage_sums`    every step of steps.msgpack has all stages in `stage_s`, and they sum
                   to between 0.85 and 1.15 of its `step_time_s`.
6. `summary_shares` summary.csv's shares sum to 1 (within 1e-3: shares are written with 6
                   decimals), each lies in [0, 1] and is its seconds' share as
                   protocol.catalogue.stage_shares defines it.

With no RUN, a short profiled smoke run is made first, in a harness temp dir (removed at
the end). Result lines, JSON shape, exit codes, cancel: see trainerd/verify/harness.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from protocol.catalogue import STAGES, stage_shares
from protocol.rundir import RunDirError, RunPaths, resolve_run
from protocol.steplog import read_steplog
from trainerd.tools import profiler
from trainerd.tools.profiler import OP_STATS_FILE, SUMMARY_FILE, TRACE_FILE, ProfileError
from trainerd.verify.harness import (
    CheckList,
    CouldNotFinish,
    CouldNotRun,
    Harness,
    run_check,
    run_trainer,
    write_config_toml,
)

SUM_LOW, SUM_HIGH = 0.85, 1.15  # stages / step_time_s (SPEC section 6)
SHARE_TOLERANCE = 1e-3
REMAINDER_STAGE = "other"

# The self-made run (no RUN given): short, with a window past the first step so the
# profiled steps are warm, and small enough to stay well under a minute on 2 cores.
SELF_RUN_STEPS = 6
SELF_RUN_WINDOW = (3, 5)
SELF_RUN_TIMEOUT_S = 150
SELF_RUN_CONFIG = {"sft_steps": 30, "rm_steps": 30}  # setup M2 does not measure, kept short


def _add(checks: CheckList, name: str, detail: str, problems: list[str]) -> None:
    checks.add(name, not problems, detail, problems=problems)


def _read_artifact_csv(path, problems: list[str], root) -> list[dict] | None:
    """The CSV's rows, or None after noting why not (opened inside the run dir `root` only)."""
    try:
        return profiler.read_csv(path, root=root)
    except ProfileError as e:
        problems.append(str(e))
        return None


def check_trace(checks: CheckList, paths: RunPaths) -> dict | None:
    problems: list[str] = []
    try:
        trace = profiler.load_trace(paths.profile / TRACE_FILE, root=paths.root)
    except ProfileError as e:
        _add(checks, "chrome_trace", "trace missing or unparsable", [str(e)])
        return None
    n = sum(1 for ev in trace["traceEvents"] if ev.get("ph") == "X")
    if n == 0:
        problems.append(f"{paths.profile / TRACE_FILE}: no complete ('X') events, nothing was profiled")
    _add(checks, "chrome_trace", f"{len(trace['traceEvents'])} events ({n} complete)", problems)
    return trace


def check_op_stats(checks: CheckList, paths: RunPaths) -> None:
    problems: list[str] = []
    path = paths.profile / OP_STATS_FILE
    rows = _read_artifact_csv(path, problems, paths.root)
    if rows is None:
        return _add(checks, "op_stats", "op_stats missing or unparsable", problems)
    if not rows:
        return _add(checks, "op_stats", "", [f"{path}: no operator rows"])
    missing = [col for col in profiler.OP_STATS_COLUMNS if col not in rows[0]]
    if missing:
        return _add(checks, "op_stats", "", [f"{path}: lacks columns {missing}"])
    for i, row in enumerate(rows, start=2):
        try:
            calls = int(row["calls"])
            self_us = float(row["self_cpu_us"])
            total_us = float(row["total_cpu_us"])
        except ValueError:
            problems.append(f"{path}: line {i} ({row['name']!r}) has a non-numeric calls or time")
            continue
        if calls < 1 or not (math.isfinite(self_us) and math.isfinite(total_us)) or self_us < 0:
            problems.append(f"{path}: line {i} ({row['name']!r}) has calls={calls}, self={self_us}, total={total_us}")
        elif self_us > total_us + 1e-3 * max(1.0, total_us):
            problems.append(f"{path}: line {i} ({row['name']!r}) self time {self_us} us exceeds total {total_us} us")
    _add(checks, "op_stats", f"{len(rows)} operators, top {rows[0]['name']!r}", problems)


def check_summary(checks: CheckList, paths: RunPaths) -> list[dict] | None:
    problems: list[str] = []
    path = paths.profile / SUMMARY_FILE
    rows = _read_artifact_csv(path, problems, paths.root)
    if rows is None:
        _add(checks, "summary", "summary missing or unparsable", problems)
        return None
    if rows:
        cols = ("stage", "seconds", "share", "ms_per_token", "peak_memory_bytes")
        missing_cols = [col for col in cols if col not in rows[0]]
        if missing_cols:
            _add(checks, "summary", "", [f"{path}: lacks columns {missing_cols}"])
            return None
    stages = [r["stage"] for r in rows]
    missing = [s for s in STAGES if s not in stages]
    extra = [s for s in stages if s not in STAGES]
    dupes = sorted({s for s in stages if stages.count(s) > 1})
    if missing:
        problems.append(f"{path}: no row for stages {missing}")
    if extra:
        problems.append(f"{path}: rows for unknown stages {extra}")
    if dupes:
        problems.append(f"{path}: duplicate rows for {dupes}")
    for r in rows:
        for col in ("seconds", "share", "ms_per_token"):
            try:
                v = float(r[col])
            except ValueError:
                problems.append(f"{path}: stage {r['stage']!r}: {col} {r[col]!r} is not a number")
                continue
            if not math.isfinite(v) or v < 0:
                problems.append(f"{path}: stage {r['stage']!r}: {col} = {v} (must be finite and >= 0)")
    _add(checks, "summary", f"{len(rows)} stages", problems)
    return rows


def check_stage_ranges(checks: CheckList, paths: RunPaths, trace: dict | None) -> None:
    problems: list[str] = []
    if trace is None:
        return _add(
            checks, "stage_ranges", "", [f"{paths.profile / TRACE_FILE}: unavailable, cannot look for stage ranges"]
        )
    analysis = profiler.analyze_trace(trace)
    present = analysis.stages_in_trace()
    required = [s for s in STAGES if s != REMAINDER_STAGE or REMAINDER_STAGE in present]
    missing = [s for s in required if s not in present]
    for s in missing:
        problems.append(f"{paths.profile / TRACE_FILE}: no record_function range for stage {s!r}")
    by_step = analysis.stages_by_step()
    for step in sorted(by_step):
        lacking = [s for s in required if s not in missing and s not in by_step[step]]
        if lacking:
            problems.append(f"{paths.profile / TRACE_FILE}: profiled step {step} has no range for {lacking}")
    exempt = "" if REMAINDER_STAGE in present else f"; {REMAINDER_STAGE!r} is the remainder (no range needed)"
    detail = (
        f"{len(analysis.stage_ranges)} stage ranges over {len(by_step)} profiled steps"
        f" (steps {min(by_step)}..{max(by_step)})"
        if by_step
        else f"{len(analysis.stage_ranges)} stage ranges (no ProfilerStep# ranges)"
    ) + exempt
    _add(checks, "stage_ranges", detail, problems)


def check_stage_sums(checks: CheckList, paths: RunPaths) -> None:
    if not paths.steps.exists():
        return _add(checks, "stage_sums", "", [f"{paths.steps}: missing"])
    records, stats = read_steplog(paths.steps)
    if not records:
        return _add(checks, "stage_sums", "", [f"{paths.steps}: no step records"])
    problems: list[str] = []
    worst = None
    for r in records:
        step = r.get("step", "?")
        where = f"{paths.steps.name} step {step}"
        stage_s = r.get("stage_s")
        step_time = r.get("step_time_s")
        if not isinstance(stage_s, dict):
            problems.append(f"{where}: no stage_s map")
            continue
        lacking = [s for s in STAGES if s not in stage_s]
        if lacking:
            problems.append(f"{where}: stage_s lacks {lacking}")
            continue
        vals = [stage_s[s] for s in STAGES]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            problems.append(f"{where}: stage_s has a non-finite or non-numeric value")
            continue
        if not isinstance(step_time, (int, float)) or not math.isfinite(step_time) or step_time <= 0:
            problems.append(f"{where}: step_time_s is {step_time!r}")
            continue
        ratio = sum(vals) / step_time
        if worst is None or abs(ratio - 1) > abs(worst[1] - 1):
            worst = (step, ratio)
        if not SUM_LOW <= ratio <= SUM_HIGH:
            problems.append(
                f"{where}: stages sum to {sum(vals):.6f} s = {ratio:.3f} of step_time_s "
                f"{step_time:.6f} (allowed {SUM_LOW}..{SUM_HIGH})"
            )
    detail = f"{len(records)} steps"
    if worst is not None:
        detail += f", worst ratio {worst[1]:.3f} at step {worst[0]}"
    if stats.corrupt_frames:
        detail += f"; {stats.corrupt_frames} corrupt frame(s) skipped"
    _add(checks, "stage_sums", detail, problems)


def check_summary_shares(checks: CheckList, paths: RunPaths, rows: list[dict] | None) -> None:
    path = paths.profile / SUMMARY_FILE
    if rows is None:
        return _add(checks, "summary_shares", "", [f"{path}: unavailable, cannot sum the shares"])
    problems: list[str] = []
    mismatched: list[str] = []
    total = 0.0
    shares: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for r in rows:
        try:
            share = float(r["share"])
        except (KeyError, ValueError):
            problems.append(f"{path}: stage {r.get('stage')!r}: share {r.get('share')!r} is not a number")
            continue
        if not (0.0 <= share <= 1.0):
            problems.append(f"{path}: stage {r.get('stage')!r}: share {share} outside [0, 1]")
        total += share
        shares[r.get("stage")] = share
        try:
            seconds[r.get("stage")] = float(r["seconds"])
        except (KeyError, ValueError):
            pass  # the summary check says so
    if abs(total - 1.0) > SHARE_TOLERANCE:
        problems.insert(0, f"{path}: shares sum to {total:.6f}, not 1 (tolerance {SHARE_TOLERANCE})")
    for stage, expected in stage_shares(seconds).items():
        if stage in shares and abs(shares[stage] - expected) > SHARE_TOLERANCE:
            mismatched.append(f"{path}: stage {stage!r}: share {shares[stage]:.6f}, its seconds give {expected:.6f}")
    _add(checks, "summary_shares", f"shares sum to {total:.6f}", problems + mismatched)


def run_checks(checks: CheckList, paths: RunPaths) -> None:
    """All the checks on a run dir, each added to `checks` as it completes."""
    trace = check_trace(checks, paths)
    check_op_stats(checks, paths)
    summary = check_summary(checks, paths)
    check_stage_ranges(checks, paths, trace)
    check_stage_sums(checks, paths)
    check_summary_shares(checks, paths, summary)


def make_profiled_run(h: Harness) -> Path:
    """A short smoke run with a profiled window in a harness temp dir; returns its run dir.

    `trainerd start --smoke --foreground` as a harness trainer: the run gets its own process
    (the profiler and the trainer's global torch state stay out of ours), and it is what a
    user would run. A config file shortens the warm start and the reward-model training,
    which M2 does not look at. CouldNotRun with one line on failure."""
    runs_dir = h.tempdir()
    config = write_config_toml(runs_dir / "verify_m2.toml", SELF_RUN_CONFIG)
    args = ["start", "--smoke", "--foreground", "--config", str(config), "--runs-dir", str(runs_dir)]
    args += ["--run-id", "verify-m2", "--steps", str(SELF_RUN_STEPS)]
    args += ["--profile-steps", f"{SELF_RUN_WINDOW[0]}:{SELF_RUN_WINDOW[1]}"]
    h.progress(
        f"no RUN given, making a {SELF_RUN_STEPS}-step smoke run profiled at steps "
        f"{SELF_RUN_WINDOW[0]}:{SELF_RUN_WINDOW[1]} in {runs_dir}"
    )
    try:
        run_trainer(args, runs_dir / "verify-m2.out", SELF_RUN_TIMEOUT_S, what="the profiled smoke run")
    except CouldNotFinish as e:
        raise CouldNotRun(str(e)) from None
    return runs_dir / "verify-m2"


def _verify(h: Harness, run: str | None) -> None:
    if run is None:
        run = str(make_profiled_run(h))
    try:
        paths = resolve_run(run)
    except RunDirError as e:
        raise CouldNotRun(str(e)) from None
    h.run = str(paths.root)
    h.progress(f"checking {paths.root}")
    run_checks(h.checks, paths)


def run(run: str | None, as_json: bool) -> int:
    """Entry point of `trainerd verify m2 [RUN] [--json]`; returns the exit code."""
    return run_check("m2", as_json, lambda h: _verify(h, run), run)
