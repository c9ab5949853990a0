"""`trainerd verify m3 [RUN] [--json]`: the M3 stability check.

With RUN: the run's records and events against the contract (SPEC sections 5 and 8):
- every catalogue field present with the right type in every record (`check_record`);
- steps.jsonl mirrors steps.msgpack exactly, NaN and +-Inf included;
- TensorBoard keeps the non-finite values too (when the run has tb/ event files);
- every alert event in events.jsonl carries rule, metric, value, threshold, first_step
  and a one-line explanation.

With no RUN: makes a clean smoke run (no critical alert may fire) and short injected
runs, and checks that each injection fires its alert within a few steps of its step
(see `INJECTION_EXPECTATIONS`), then runs the checks above on each of them.

Exit 0 only if every check passed. Progress goes to stderr; with `--json`, stdout
gets exactly one JSON object:
{"check": "m3", "passed": bool, "checks": [{"name", "passed", "detail"}], "run": ..., "duration_s": ...}
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

from protocol import catalogue
from protocol.events import ALERT_EVENTS
from protocol.jsonl import read_jsonl
from protocol.rundir import RunDirError, RunPaths, effective_status, read_events, read_manifest, resolve_run
from protocol.steplog import read_steplog
from trainerd.verify.harness import CheckList

ALERT_FIELDS = ("rule", "metric", "value", "threshold", "first_step", "explanation")


class Checks(CheckList):
    """Prints each result as it lands (stdout, or stderr under --json)."""

    def __init__(self, as_json: bool):
        super().__init__(lambda line: print("  " + line, file=sys.stderr if as_json else sys.stdout, flush=True))
        self.as_json = as_json

    def progress(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


# -- value comparison -------------------------------------------------------------------


def _bits(v: float) -> bytes:
    return struct.pack("<d", v)


def same_value(a, b) -> bool:
    """Equal as the contract wants: same type, floats bit-identical except that any NaN equals any NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) and isinstance(b, float):
        if a != a or b != b:
            return a != a and b != b
        return _bits(a) == _bits(b)
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _non_finite_fields(rec: dict):
    """(field, value) of every non-finite float in a record (maps as field.key)."""
    for k, v in rec.items():
        if isinstance(v, float) and not math.isfinite(v):
            yield k, v
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, float) and not math.isfinite(vv):
                    yield f"{k}.{kk}", vv


def _fmt(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    return repr(v)


# -- checks on one run dir --------------------------------------------------------------


def check_run(paths: RunPaths, checks: Checks, prefix: str = "") -> list[dict] | None:
    """Schema, mirror, TensorBoard and alert-event checks of one run; returns its records."""
    p = prefix
    try:
        running = effective_status(read_manifest(paths), paths) == "running"
    except RunDirError:
        running = False
    if not paths.steps.exists():
        checks.add(f"{p}step log", False, f"{paths.steps} does not exist")
        return None
    records, stats = read_steplog(paths.steps)
    steps = [r.get("step") for r in records]
    problems = []
    if not records:
        problems.append("no records")
    if stats.corrupt_frames:
        problems.append(f"{stats.corrupt_frames} corrupt frame(s)")
    ints = [s for s in steps if isinstance(s, int)]
    if len(ints) == len(steps) and ints:
        dups = len(ints) - len(set(ints))
        if dups:
            problems.append(f"{dups} duplicate step(s)")
        if ints != sorted(ints):
            problems.append("steps out of order")
        elif ints[-1] - ints[0] + 1 != len(set(ints)):
            problems.append(f"gaps between steps {ints[0]} and {ints[-1]}")
    checks.add(
        f"{p}step log",
        not problems,
        "; ".join(problems) if problems else f"{len(records)} framed records, steps {ints[0]}..{ints[-1]}",
    )
    if not records:
        return records

    # 1. schema: every catalogue field with the right type in every record
    bad = []
    for r in records:
        for prob in catalogue.check_record(r):
            bad.append(f"step {r.get('step')}: {prob}")
    nfields = len(catalogue.required_fields())
    checks.add(
        f"{p}schema",
        not bad,
        f"{len(bad)} problem(s), first: {'; '.join(bad[:3])}"
        if bad
        else f"all {nfields} required catalogue fields present and typed in {len(records)} records",
    )

    # 2. JSONL mirror identical to the framed log, NaN / Inf included
    nonfinite = sum(1 for r in records for _ in _non_finite_fields(r))
    if not paths.steps_jsonl.exists():
        checks.add(f"{p}jsonl mirror", False, f"{paths.steps_jsonl} does not exist")
    else:
        mirror = read_jsonl(paths.steps_jsonl)
        diffs = []
        if running and 0 <= len(records) - len(mirror) <= 1:
            mirror_records = records[: len(mirror)]  # the newest line may not be written yet
        else:
            mirror_records = records
        if len(mirror) != len(mirror_records):
            diffs.append(f"{len(mirror)} JSONL records vs {len(records)} framed")
        for a, b in zip(mirror_records, mirror):
            if a.keys() != b.keys():
                diffs.append(f"step {a.get('step')}: keys differ ({sorted(set(a) ^ set(b))})")
                continue
            for k in a:
                if not same_value(a[k], b[k]):
                    diffs.append(f"step {a.get('step')}: {k} {_fmt(a[k])} vs {_fmt(b[k])}")
            if len(diffs) > 20:
                break
        raw = paths.steps_jsonl.read_text(errors="replace")
        if nonfinite and "null" in raw and not diffs:
            diffs.append('steps.jsonl holds null values (NaN must be written as "NaN")')
        checks.add(
            f"{p}jsonl mirror",
            not diffs,
            f"{len(diffs)} difference(s), first: {'; '.join(diffs[:3])}"
            if diffs
            else f"{len(records)} records identical, {nonfinite} non-finite value(s) kept in both",
        )

    # 3. TensorBoard keeps non-finite values (float32 scalars: compare NaN/Inf exactly, finite approx.)
    _check_tensorboard(paths, records, checks, p, running)

    # 4. alert events carry what SPEC section 8 asks
    events = read_events(paths) if paths.events.exists() else []
    alerts = [e for e in events if e.get("event") in ALERT_EVENTS]
    bad = []
    for e in alerts:
        missing = [f for f in ALERT_FIELDS if f not in e]
        if missing:
            bad.append(f"{e.get('event')} {e.get('rule', '?')}: missing {', '.join(missing)}")
            continue
        if not isinstance(e["first_step"], int) or isinstance(e["first_step"], bool):
            bad.append(f"{e['rule']}: first_step {e['first_step']!r} is not an int")
        if not isinstance(e["value"], (int, float)) or isinstance(e["value"], bool):
            bad.append(f"{e['rule']}: value {e['value']!r} is not a number")
        if not isinstance(e["threshold"], (int, float)) or isinstance(e["threshold"], bool):
            bad.append(f"{e['rule']}: threshold {e['threshold']!r} is not a number")
        if not isinstance(e["explanation"], str) or not e["explanation"].strip() or "\n" in e["explanation"]:
            bad.append(f"{e['rule']}: explanation is not one non-empty line")
        if e["metric"] not in catalogue.METRICS:
            bad.append(f"{e['rule']}: unknown metric {e['metric']!r}")
    if not paths.events.exists():
        checks.add(f"{p}alert events", False, f"{paths.events} does not exist")
    else:
        fired = sorted({e.get("rule") for e in alerts if e.get("event") == "alert"})
        checks.add(
            f"{p}alert events",
            not bad,
            f"{len(bad)} problem(s), first: {'; '.join(bad[:3])}"
            if bad
            else f"{len(alerts)} alert event(s) complete" + (f" (fired: {', '.join(fired)})" if fired else ""),
        )
    return records


def load_tensorboard(tb_dir: Path) -> dict[str, dict[int, float]] | None:
    """tag -> {step: value} of every scalar in a tb/ dir (None if it holds no event files)."""
    files = sorted(glob.glob(str(tb_dir / "**" / "events.out.tfevents.*"), recursive=True))
    if not files:
        return None
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[str, dict[int, float]] = {}
    for f in files:
        for ev in EventFileLoader(f).Load():
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    x = float(v.simple_value)
                elif v.HasField("tensor"):
                    try:
                        x = float(tensor_util.make_ndarray(v.tensor).reshape(()))
                    except Exception:
                        continue
                else:
                    continue
                out.setdefault(v.tag, {})[int(ev.step)] = x
    return out


def _tb_tag(field: str, tags) -> str | None:
    """The TensorBoard tag of a field (`kl`, `group/kl`, `stage_s/rollout`, ...)."""
    cands = [field, field.replace(".", "/")]
    for c in cands:
        if c in tags:
            return c
    for c in cands:
        hits = [t for t in tags if t.endswith("/" + c)]
        if len(hits) == 1:
            return hits[0]
    return None


def _check_tensorboard(paths: RunPaths, records: list[dict], checks: Checks, p: str, running: bool = False) -> None:
    try:
        scalars = load_tensorboard(paths.tb)
    except ImportError:
        checks.add(f"{p}tensorboard", True, "tensorboard not installed: not checked")
        return
    if scalars is None:
        if not paths.tb.exists():  # a run from another framework: nothing to compare
            checks.add(f"{p}tensorboard", True, "no tb/ dir: not checked")
        else:
            checks.add(f"{p}tensorboard", False, f"no TensorBoard event files in {paths.tb}")
        return
    problems, compared, nonfin = [], 0, 0
    missing_tags = set()
    pending = 0
    if running:  # TensorBoard is flushed every few steps: the newest steps may not be there yet
        last_tb = max((max(v) for v in scalars.values() if v), default=0)
        pending = sum(1 for r in records if isinstance(r.get("step"), int) and r["step"] > last_tb)
        records = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= last_tb]
    for r in records:
        step = r.get("step")
        for k, v in r.items():
            vals = [(k, v)] if not isinstance(v, dict) else [(f"{k}.{kk}", vv) for kk, vv in v.items()]
            for name, x in vals:
                if name == "step" or isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                tag = _tb_tag(name, scalars)
                if tag is None:
                    missing_tags.add(name)
                    continue
                got = scalars[tag].get(step)
                if got is None:
                    problems.append(f"{tag} has no value at step {step}")
                    continue
                compared += 1
                x = float(x)
                if not math.isfinite(x):
                    nonfin += 1
                    if not same_value(x, got) and not (x != x and got != got):
                        problems.append(f"step {step} {name}: {_fmt(x)} in the log, {_fmt(got)} in TensorBoard")
                elif not math.isfinite(got):
                    problems.append(f"step {step} {name}: {_fmt(x)} in the log, {_fmt(got)} in TensorBoard")
                elif abs(got - x) > 1e-6 * max(1.0, abs(x)) and name not in ("time",):
                    # float32 rounding is fine; anything more is not
                    if abs(got - x) > 1e-3 * max(1.0, abs(x)):
                        problems.append(f"step {step} {name}: {x!r} in the log, {got!r} in TensorBoard")
    numeric = [m for m in catalogue.numeric_fields() if m not in ("step", "time")]
    lost = sorted(m for m in missing_tags if m in numeric)
    if lost:
        problems.append(f"no TensorBoard tag for {', '.join(lost[:5])}")
    checks.add(
        f"{p}tensorboard",
        not problems,
        f"{len(problems)} problem(s), first: {'; '.join(problems[:3])}"
        if problems
        else f"{compared} scalars match the step log, {nonfin} non-finite kept"
        + (f" ({pending} newest step(s) not flushed yet: the run is running)" if pending else ""),
    )


# -- live runs: a clean smoke run and one run per injection ----------------------------------

# Every live run is the smoke preset shortened to LIVE_STEPS, same seed: so the runs agree
# bit for bit on every step before their injection (what the tests use to show that an
# injection changes nothing else). (spec, steps after STEP the expected alert may fire in):
# the trend rule needs its window of steps first, so reward_hack gets the rule's window (20)
# + consecutive (3) + a margin.
LIVE_STEPS = 32
LIVE_SEED = 0
LIVE_RUNS: tuple[tuple[str | None, int], ...] = (
    (None, 0),  # the clean run: no critical alert may fire
    ("reward_hack@1", 28),
    ("kl_blowup@5", 6),
    ("entropy_collapse@8", 2),
    ("grad_explode@8", 1),
    ("nan@8", 0),
)
RUN_TIMEOUT_S = 150.0  # one trainer process (a run here takes ~5-15 s on an idle 2-core box)
TOTAL_BUDGET_S = 240.0  # all the live runs; a run still going at the deadline is killed and fails
PARALLEL = 2  # two trainer processes, one thread each (2 cores)


def _expected(kind: str) -> tuple[str, ...]:
    from trainerd.tools.inject import EXPECTED_ALERTS

    return EXPECTED_ALERTS[kind]


def _start_run(
    runs_dir: Path, run_id: str, spec: str | None, steps: int, seed: int, timeout: float = RUN_TIMEOUT_S
) -> tuple[int, str, float]:
    """One `trainerd start --smoke --foreground` in its own process; (exit code, last log line, seconds)."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "trainerd",
        "start",
        "--smoke",
        "--foreground",
        "--runs-dir",
        str(runs_dir),
        "--run-id",
        run_id,
        "--steps",
        str(steps),
        "--seed",
        str(seed),
    ]
    if spec:
        cmd += ["--inject", spec]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("SEED", None)
    log = runs_dir / f"{run_id}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=max(1.0, timeout)).returncode
        except subprocess.TimeoutExpired:
            f.write(f"verify m3: killed after {timeout:.0f}s (time budget)\n")
            rc = -9
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "USDT" not in ln]
    return rc, (lines[-1] if lines else ""), time.monotonic() - t0


def make_live_runs(
    runs_dir: Path, checks: Checks | None = None, seed: int = LIVE_SEED, runs=LIVE_RUNS, steps: int = LIVE_STEPS
) -> dict[str | None, tuple[Path, int, str, float]]:
    """Make every run of `runs` in runs_dir, PARALLEL at a time; spec -> (run dir, rc, last log line, s)."""
    from concurrent.futures import ThreadPoolExecutor

    runs_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    deadline = time.monotonic() + TOTAL_BUDGET_S

    def one(item):
        spec, _ = item
        run_id = run_id_for(spec)
        res = _start_run(runs_dir, run_id, spec, steps, seed, min(RUN_TIMEOUT_S, deadline - time.monotonic()))
        if checks is not None:
            checks.progress(f"  run {spec or 'clean'} ({steps} steps) done in {res[2]:.1f}s, exit {res[0]}")
        return spec, (runs_dir / run_id, *res)

    with ThreadPoolExecutor(PARALLEL) as pool:
        for spec, res in pool.map(one, runs):
            out[spec] = res
    return out


def run_id_for(spec: str | None) -> str:
    return (spec or "clean").replace("@", "_at_")


def _alert_events(paths: RunPaths) -> list[dict]:
    return [e for e in read_events(paths) if e.get("event") in ALERT_EVENTS] if paths.events.exists() else []


def check_clean(paths: RunPaths, rc: int, checks: Checks, last_line: str = "") -> None:
    m = read_manifest(paths)
    crit = [
        e
        for e in _alert_events(paths)
        if e.get("severity") == "critical" and e.get("event") in ("alert", "alert_escalated")
    ]
    fired = sorted({e["rule"] for e in _alert_events(paths) if e.get("event") == "alert"})
    detail = (
        f"status {m.get('status')}, {m.get('last_step')} steps, warnings: {', '.join(fired) or 'none'}"
        if not crit
        else "critical alert(s): " + "; ".join(f"{e['rule']} at step {e.get('step')}" for e in crit[:3])
    )
    if rc != 0:
        detail += f"; trainer exit {rc}: {last_line[-160:]}"
    checks.add("clean: no critical alert", rc == 0 and m.get("status") == "finished" and not crit, detail)


def injection_outcome(paths: RunPaths, kind: str, step: int, tolerance: int) -> dict:
    """When the expected alert of an injected run fired: {'fired_step', 'rule', 'message', ...}."""
    expected = _expected(kind)
    hits = [
        e
        for e in _alert_events(paths)
        if e.get("rule") in expected
        and e.get("event") in ("alert", "alert_escalated")
        and isinstance(e.get("step"), int)
        and e["step"] >= step
    ]
    first = min(hits, key=lambda e: e["step"]) if hits else None
    return {
        "kind": kind,
        "injected_step": step,
        "expected": list(expected),
        "fired_step": first["step"] if first else None,
        "rule": first["rule"] if first else None,
        "event": first["event"] if first else None,
        "message": first.get("message") if first else None,
        "within": bool(first and first["step"] - step <= tolerance),
        "tolerance": tolerance,
    }


def check_injected(paths: RunPaths, spec: str, rc: int, tolerance: int, checks: Checks, last_line: str = "") -> dict:
    from trainerd.tools.inject import Injection

    inj = Injection.parse(spec)
    out = injection_outcome(paths, inj.kind, inj.step, tolerance)
    if out["fired_step"] is None:
        others = sorted({e["rule"] for e in _alert_events(paths) if e.get("event") == "alert"})
        detail = (
            f"{'/'.join(out['expected'])} never fired at or after step {inj.step} "
            f"(fired: {', '.join(others) or 'nothing'}; trainer exit {rc}: {last_line[-160:]})"
        )
    else:
        detail = (
            f"{out['rule']} {'escalated' if out['event'] == 'alert_escalated' else 'fired'} at step "
            f"{out['fired_step']} (injected at {inj.step}, allowed up to {inj.step + tolerance}): "
            f"{out['message']}"
        )
    checks.add(f"{spec}: {'/'.join(out['expected'])} fires", out["within"], detail)
    if inj.kind == "nan":
        _check_nonfinite_stop(paths, inj.step, checks, spec)
    return out


def _check_nonfinite_stop(paths: RunPaths, step: int, checks: Checks, spec: str) -> None:
    """A critical non_finite alert: the last healthy state is checkpointed and the run stops
    cleanly with status failed (the default, continue_on_nonfinite = false)."""
    m = read_manifest(paths)
    records, _ = read_steplog(paths.steps)
    problems = []
    if m.get("status") != "failed":
        problems.append(f"status {m.get('status')!r}, expected 'failed'")
    if records and records[-1].get("step") != step:
        problems.append(f"the log goes on to step {records[-1].get('step')} after the NaN at {step}")
    ckpt = paths.checkpoint_dir(step - 1)
    if not ckpt.exists():
        problems.append(f"no checkpoint of the last healthy step {step - 1}")
    else:
        rel = str(ckpt.relative_to(paths.root))
        if m.get("last_checkpoint") != rel:
            problems.append(f"run.json last_checkpoint is {m.get('last_checkpoint')!r}, not {rel!r}")
        try:
            from trainerd.run.checkpoint import load_checkpoint

            state = load_checkpoint(ckpt)
            bad = _non_finite_tensors(state.get("policy", {}))
            if bad:
                problems.append(f"checkpoint {rel} holds non-finite weights ({', '.join(bad[:3])})")
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            problems.append(f"checkpoint {rel} does not load: {e}")
    stops = [e for e in read_events(paths) if e.get("event") == "stopped"]
    if not stops or stops[-1].get("status") != "failed":
        problems.append("no 'stopped' event with status failed")
    checks.add(
        f"{spec}: stops cleanly",
        not problems,
        "; ".join(problems)
        if problems
        else f"status failed, last healthy state checkpointed at step {step - 1} (finite weights), "
        f"reason: {stops[-1].get('reason')}",
    )


def _non_finite_tensors(state: dict) -> list[str]:
    import torch

    return [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def run_live(checks: Checks, runs_dir: str | os.PathLike | None = None) -> str | None:
    """Make the clean and injected runs and check them. Runs go to a temp dir (removed after)
    unless `runs_dir` is given."""
    import shutil
    import tempfile

    keep = runs_dir is not None
    root = Path(runs_dir) if keep else Path(tempfile.mkdtemp(prefix="verify-m3-"))
    try:
        checks.progress(f"verify m3: {len(LIVE_RUNS)} runs of {LIVE_STEPS} smoke steps in {root}, {PARALLEL} at a time")
        made = make_live_runs(root, checks)
        outcomes = []
        for spec, tol in LIVE_RUNS:
            run_dir, rc, last, secs = made[spec]
            paths = RunPaths(run_dir)
            name = spec or "clean"
            if not paths.manifest.exists():
                checks.add(f"{name}: run", False, f"the run did not start (exit {rc}): {last}")
                continue
            if spec is None:
                check_clean(paths, rc, checks, last)
            else:
                outcomes.append(check_injected(paths, spec, rc, tol, checks, last))
            check_run(paths, checks, prefix=f"{name}: ")
        if outcomes:
            checks.progress(f"  {'injection':<16} {'STEP':>4} {'fired':>6}  alert")
            for o in outcomes:
                checks.progress(f"  {o['kind']:<16} {o['injected_step']:>4} {str(o['fired_step']):>6}  {o['message']}")
        return str(root) if keep else None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# -- entry point --------------------------------------------------------------------------


def run(run: str | None, as_json: bool = False, runs_dir: str | os.PathLike | None = None) -> int:
    """Exit code 0 only if every check passed (2: RUN is not a readable run). Without RUN, the
    live runs are made in a temp dir, or in `runs_dir` (kept) when given."""
    t0 = time.monotonic()
    checks = Checks(as_json)
    run_path = None
    try:
        if run is not None:
            try:
                paths = resolve_run(run)
                read_manifest(paths)
            except RunDirError as e:
                print(f"trainerd verify m3: {e}", file=sys.stderr)
                if as_json:
                    checks.add("run dir", False, str(e))
                    _emit_json(checks, str(run), t0)
                return 2
            run_path = str(paths.root)
            checks.progress(f"verify m3: checking {paths.root}")
            check_run(paths, checks)
        else:
            run_path = run_live(checks, runs_dir)
    except KeyboardInterrupt:
        checks.add("interrupted", False, "stopped by the user")
    except Exception as e:  # a bug must still give one JSON object to the monitor
        checks.add("internal error", False, f"{type(e).__name__}: {e}")
    passed = checks.passed
    if as_json:
        _emit_json(checks, run_path, t0)
    else:
        n_fail = sum(not c["passed"] for c in checks.items)
        print(
            f"verify m3: {'PASSED' if passed else f'FAILED ({n_fail} of {len(checks.items)} checks)'}"
            f" in {time.monotonic() - t0:.1f}s"
        )
    return 0 if passed else 1


def _emit_json(checks: Checks, run_path, t0: float) -> None:
    out = {
        "check": "m3",
        "passed": checks.passed,
        "checks": checks.items,
        "run": run_path,
        "duration_s": round(time.monotonic() - t0, 3),
    }
    sys.stdout.write(json.dumps(out, allow_nan=False) + "\n")
    sys.stdout.flush()
