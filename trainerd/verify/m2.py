"""`trainerd verify m2 [RUN] [--json]`: the profiler's artifacts are there and add up.

Checks, in order (each one is reported, a failure says which file or step and why):

1. `chrome_trace`  profile/chrome_trace.json exists and is a Chrome trace that parses as
                   strict JSON (no NaN/Infinity: Perfetto rejects them), every complete
                   event has a numeric ts and dur.
2. `op_stats`      profile/op_stats.csv exists, parses, has the operator columns, at least
                   one row, calls >= 1 and self time <= total time on every row.
3. `summary`       profile/summary.csv exists, parses, one row per stage of STAGES.
4. `stage_ranges`  the trace holds a record_function range for every stage, and every
                   profiled step (ProfilerStep#N range) holds one of each. `other` is
                   exempt unless the trace has an `other` range at all: it is the
                   remainder of the step (the time between and around the named stages:
                   loop bookkeeping, logging), which is not one contiguous region a
                   range could wrap. If the trainer does wrap something as `other`, it
                   must do so in every profiled step.
5. `stage_sums`    every step of steps.msgpack has all stages in `stage_s`, and they sum
                   to between 0.85 and 1.15 of its `step_time_s`.
6. `summary_shares` summary.csv's shares sum to 1 (within 1e-3: shares are written
                   with 6 decimals) and each lies in [0, 1].

Exit 0 only if all hold, 1 if any failed, 2 if the run cannot be found or made.
Human output prints each check to stdout as it completes. With `--json`, stdout is ONE
JSON object (the monitor's verify button parses it) and progress goes to stderr:
    {"check": "m2", "passed": bool, "checks": [{"name", "passed", "detail", "problems"}],
     "run": path, "duration_s": float}

With no RUN, it makes a short profiled smoke run in a temporary runs dir first (removed
afterwards if the checks passed, kept for inspection if not; TRAINERD_KEEP_VERIFY_RUN=1
keeps it always).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.catalogue import STAGES
from protocol.rundir import RunDirError, RunPaths, resolve_run
from protocol.steplog import read_steplog
from trainerd.tools import profiler
from trainerd.tools.profiler import OP_STATS_FILE, SUMMARY_FILE, TRACE_FILE, ProfileError

SUM_LOW, SUM_HIGH = 0.85, 1.15  # stages / step_time_s (SPEC section 6)
SHARE_TOLERANCE = 1e-3
MAX_LINES_PER_CHECK = 10  # a run with 10k bad steps should not print 10k lines
REMAINDER_STAGE = "other"

# The self-made run (no RUN given): short, with a window past the first step so the
# profiled steps are warm, and small enough to stay well under a minute on 2 cores.
SELF_RUN_STEPS = 6
SELF_RUN_WINDOW = (3, 5)
SELF_RUN_TIMEOUT_S = 150
SELF_RUN_CONFIG = {"sft_steps": 30, "rm_steps": 30}  # setup M2 does not measure, kept short


@dataclass
class Check:
    name: str
    passed: bool = True
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.passed = False
        self.problems.append(problem)

    def to_json(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "problems": self.problems}


# --------------------------------------------------------------------------- the checks


def check_trace(paths: RunPaths) -> tuple[Check, dict | None]:
    c = Check("chrome_trace")
    try:
        trace = profiler.load_trace(paths.profile / TRACE_FILE)
    except ProfileError as e:
        c.fail(str(e))
        c.detail = "trace missing or unparsable"
        return c, None
    n = sum(1 for ev in trace["traceEvents"] if ev.get("ph") == "X")
    if n == 0:
        c.fail(f"{paths.profile / TRACE_FILE}: no complete ('X') events, nothing was profiled")
    c.detail = f"{len(trace['traceEvents'])} events ({n} complete)"
    return c, trace


def _read_artifact_csv(c: Check, path) -> list[dict] | None:
    """The CSV's rows, or None after failing `c` with the reason."""
    try:
        return profiler.read_csv(path)
    except ProfileError as e:
        c.fail(str(e))
        c.detail = f"{c.name} missing or unparsable"
        return None


def check_op_stats(paths: RunPaths) -> Check:
    c = Check("op_stats")
    path = paths.profile / OP_STATS_FILE
    rows = _read_artifact_csv(c, path)
    if rows is None:
        return c
    if not rows:
        c.fail(f"{path}: no operator rows")
        return c
    missing = [col for col in profiler.OP_STATS_COLUMNS if col not in rows[0]]
    if missing:
        c.fail(f"{path}: lacks columns {missing}")
        return c
    for i, row in enumerate(rows, start=2):
        try:
            calls = int(row["calls"])
            self_us = float(row["self_cpu_us"])
            total_us = float(row["total_cpu_us"])
        except ValueError:
            c.fail(f"{path}: line {i} ({row['name']!r}) has a non-numeric calls or time")
            continue
        if calls < 1 or not (math.isfinite(self_us) and math.isfinite(total_us)) or self_us < 0:
            c.fail(f"{path}: line {i} ({row['name']!r}) has calls={calls}, self={self_us}, total={total_us}")
        elif self_us > total_us + 1e-3 * max(1.0, total_us):
            c.fail(f"{path}: line {i} ({row['name']!r}) self time {self_us} us exceeds total {total_us} us")
    c.detail = f"{len(rows)} operators, top {rows[0]['name']!r}"
    return c


def check_summary(paths: RunPaths) -> tuple[Check, list[dict] | None]:
    c = Check("summary")
    path = paths.profile / SUMMARY_FILE
    rows = _read_artifact_csv(c, path)
    if rows is None:
        return c, None
    if rows:
        missing_cols = [
            col for col in ("stage", "seconds", "share", "ms_per_token", "peak_memory_bytes") if col not in rows[0]
        ]
        if missing_cols:
            c.fail(f"{path}: lacks columns {missing_cols}")
            return c, None
    stages = [r["stage"] for r in rows]
    missing = [s for s in STAGES if s not in stages]
    extra = [s for s in stages if s not in STAGES]
    dupes = sorted({s for s in stages if stages.count(s) > 1})
    if missing:
        c.fail(f"{path}: no row for stages {missing}")
    if extra:
        c.fail(f"{path}: rows for unknown stages {extra}")
    if dupes:
        c.fail(f"{path}: duplicate rows for {dupes}")
    for r in rows:
        for col in ("seconds", "share", "ms_per_token"):
            try:
                v = float(r[col])
            except ValueError:
                c.fail(f"{path}: stage {r['stage']!r}: {col} {r[col]!r} is not a number")
                continue
            if not math.isfinite(v) or v < 0:
                c.fail(f"{path}: stage {r['stage']!r}: {col} = {v} (must be finite and >= 0)")
    c.detail = f"{len(rows)} stages"
    return c, rows


def check_stage_ranges(paths: RunPaths, trace: dict | None) -> Check:
    c = Check("stage_ranges")
    if trace is None:
        c.fail(f"{paths.profile / TRACE_FILE}: unavailable, cannot look for stage ranges")
        return c
    analysis = profiler.analyze_trace(trace)
    present = analysis.stages_in_trace()
    required = [s for s in STAGES if s != REMAINDER_STAGE or REMAINDER_STAGE in present]
    missing = [s for s in required if s not in present]
    for s in missing:
        c.fail(f"{paths.profile / TRACE_FILE}: no record_function range for stage {s!r}")
    by_step = analysis.stages_by_step()
    for step in sorted(by_step):
        lacking = [s for s in required if s not in missing and s not in by_step[step]]
        if lacking:
            c.fail(f"{paths.profile / TRACE_FILE}: profiled step {step} has no range for {lacking}")
    exempt = "" if REMAINDER_STAGE in present else f"; {REMAINDER_STAGE!r} is the remainder (no range needed)"
    c.detail = (
        f"{len(analysis.stage_ranges)} stage ranges over {len(by_step)} profiled steps"
        f" (steps {min(by_step)}..{max(by_step)})"
        if by_step
        else f"{len(analysis.stage_ranges)} stage ranges (no ProfilerStep# ranges)"
    ) + exempt
    return c


def check_stage_sums(paths: RunPaths) -> Check:
    c = Check("stage_sums")
    if not paths.steps.exists():
        c.fail(f"{paths.steps}: missing")
        return c
    records, stats = read_steplog(paths.steps)
    if not records:
        c.fail(f"{paths.steps}: no step records")
        return c
    worst = None
    for r in records:
        step = r.get("step", "?")
        where = f"{paths.steps.name} step {step}"
        stage_s = r.get("stage_s")
        step_time = r.get("step_time_s")
        if not isinstance(stage_s, dict):
            c.fail(f"{where}: no stage_s map")
            continue
        lacking = [s for s in STAGES if s not in stage_s]
        if lacking:
            c.fail(f"{where}: stage_s lacks {lacking}")
            continue
        vals = [stage_s[s] for s in STAGES]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            c.fail(f"{where}: stage_s has a non-finite or non-numeric value")
            continue
        if not isinstance(step_time, (int, float)) or not math.isfinite(step_time) or step_time <= 0:
            c.fail(f"{where}: step_time_s is {step_time!r}")
            continue
        ratio = sum(vals) / step_time
        if worst is None or abs(ratio - 1) > abs(worst[1] - 1):
            worst = (step, ratio)
        if not SUM_LOW <= ratio <= SUM_HIGH:
            c.fail(
                f"{where}: stages sum to {sum(vals):.6f} s = {ratio:.3f} of step_time_s "
                f"{step_time:.6f} (allowed {SUM_LOW}..{SUM_HIGH})"
            )
    c.detail = f"{len(records)} steps"
    if worst is not None:
        c.detail += f", worst ratio {worst[1]:.3f} at step {worst[0]}"
    if stats.corrupt_frames:
        c.detail += f"; {stats.corrupt_frames} corrupt frame(s) skipped"
    return c


def check_summary_shares(paths: RunPaths, rows: list[dict] | None) -> Check:
    c = Check("summary_shares")
    path = paths.profile / SUMMARY_FILE
    if rows is None:
        c.fail(f"{path}: unavailable, cannot sum the shares")
        return c
    total = 0.0
    for r in rows:
        try:
            share = float(r["share"])
        except (KeyError, ValueError):
            c.fail(f"{path}: stage {r.get('stage')!r}: share {r.get('share')!r} is not a number")
            continue
        if not (0.0 <= share <= 1.0):
            c.fail(f"{path}: stage {r.get('stage')!r}: share {share} outside [0, 1]")
        total += share
    if abs(total - 1.0) > SHARE_TOLERANCE:
        c.fail(f"{path}: shares sum to {total:.6f}, not 1 (tolerance {SHARE_TOLERANCE})")
    c.detail = f"shares sum to {total:.6f}"
    return c


def run_checks(paths: RunPaths, on_check=None) -> list[Check]:
    """All the checks on a run dir; `on_check(check)` is called as each one completes."""
    checks: list[Check] = []

    def done(c: Check) -> None:
        checks.append(c)
        if on_check:
            on_check(c)

    trace_check, trace = check_trace(paths)
    done(trace_check)
    done(check_op_stats(paths))
    summary_check, summary = check_summary(paths)
    done(summary_check)
    done(check_stage_ranges(paths, trace))
    done(check_stage_sums(paths))
    done(check_summary_shares(paths, summary))
    return checks


# --------------------------------------------------------------------------- output


def _print_check(c: Check, stream) -> None:
    print(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}", file=stream)
    for p in c.problems[:MAX_LINES_PER_CHECK]:
        print(f"  {p}", file=stream)
    if len(c.problems) > MAX_LINES_PER_CHECK:
        print(f"  ... and {len(c.problems) - MAX_LINES_PER_CHECK} more", file=stream)


def _emit_json(passed: bool, checks: list[Check], run_path: str | None, t0: float, **extra) -> None:
    obj = {
        "check": "m2",
        "passed": passed,
        "checks": [c.to_json() for c in checks],
        "run": run_path,
        "duration_s": round(time.monotonic() - t0, 3),
        **extra,
    }
    print(json.dumps(obj), flush=True)


def run(run: str | None, as_json: bool) -> int:
    """Entry point of `trainerd verify m2 [RUN] [--json]`; returns the exit code."""
    t0 = time.monotonic()
    progress = sys.stderr if as_json else sys.stdout
    tmp_runs: str | None = None
    passed = False
    try:
        if run is None:
            tmp_runs = tempfile.mkdtemp(prefix="trainerd-verify-m2-")
            print(
                f"verify m2: no RUN given, making a {SELF_RUN_STEPS}-step smoke run profiled at steps "
                f"{SELF_RUN_WINDOW[0]}:{SELF_RUN_WINDOW[1]} in {tmp_runs}",
                file=progress,
                flush=True,
            )
            try:
                run = str(make_profiled_run(tmp_runs))
            except RunDirError as e:
                c = Check("self_run", passed=False, detail="could not make a profiled run", problems=[str(e)])
                if as_json:
                    _emit_json(False, [c], None, t0)
                else:
                    _print_check(c, progress)
                print(f"trainerd verify m2: {e}", file=sys.stderr)
                return 2
        try:
            paths = resolve_run(run)
        except RunDirError as e:
            if as_json:
                c = Check("run", passed=False, detail="run not found", problems=[str(e)])
                _emit_json(False, [c], str(run), t0)
            print(f"trainerd verify m2: {e}", file=sys.stderr)
            return 2
        print(f"verify m2: {paths.root}", file=progress, flush=True)
        checks = run_checks(paths, on_check=lambda c: (_print_check(c, progress), progress.flush()))
        passed = all(c.passed for c in checks)
        n_failed = sum(not c.passed for c in checks)
        summary_line = (
            "m2 PASSED" if passed else f"m2 FAILED ({n_failed} of {len(checks)} checks)"
        ) + f" in {time.monotonic() - t0:.1f} s"
        print(summary_line, file=progress, flush=True)
        if as_json:
            _emit_json(passed, checks, str(paths.root), t0)
        return 0 if passed else 1
    finally:
        # The self-made run is removed when it passed; a failed one stays for inspection.
        if tmp_runs is not None:
            if passed and not os.environ.get("TRAINERD_KEEP_VERIFY_RUN"):
                shutil.rmtree(tmp_runs, ignore_errors=True)
            else:
                print(f"verify m2: the run is kept in {tmp_runs}", file=progress)


def make_profiled_run(runs_dir: str) -> Path:
    """A short smoke run with a profiled window, in `runs_dir`; returns its run dir.

    Runs `trainerd start --smoke --foreground` as a subprocess: the run gets its own
    process (the profiler and the trainer's global torch state stay out of ours), and it
    is what a user would run. A config file shortens the warm start and the reward-model
    training, which M2 does not look at, so the whole check stays well under a minute.
    Raises RunDirError with one line on failure.
    """
    config = Path(runs_dir) / "verify_m2.toml"
    config.write_text("".join(f"{k} = {v}\n" for k, v in SELF_RUN_CONFIG.items()))
    cmd = [
        sys.executable,
        "-m",
        "trainerd",
        "start",
        "--smoke",
        "--foreground",
        "--config",
        str(config),
        "--runs-dir",
        runs_dir,
        "--run-id",
        "verify-m2",
        "--steps",
        str(SELF_RUN_STEPS),
        "--profile-steps",
        f"{SELF_RUN_WINDOW[0]}:{SELF_RUN_WINDOW[1]}",
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SELF_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RunDirError(f"the profiled smoke run did not finish within {SELF_RUN_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RunDirError(f"the profiled smoke run failed (exit {proc.returncode}): {last}")
    return Path(runs_dir) / "verify-m2"


def main(argv: list[str] | None = None) -> int:  # `python -m trainerd.verify_m2 [RUN] [--json]`
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    return run(rest[0] if rest else None, as_json)


if __name__ == "__main__":
    sys.exit(main())
