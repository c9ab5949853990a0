"""`trainerd verify m3 [RUN] [--json]`: the M3 stability check.

With RUN: the run's records and events against the contract (SPEC sections 5 and 8):
- the step log: steps 1.. without gap or duplicate (harness.check_step_log);
- every catalogue field present with the right type in every record (`check_record`);
- steps.jsonl mirrors steps.msgpack exactly, NaN and +-Inf included;
- TensorBoard keeps the non-finite values too (when the run has tb/ event files);
- every alert event in events.jsonl carries rule, metric, value, threshold, first_step
  and a one-line explanation.
A run that is still being written is checked on a consistent snapshot: the steps that
both steps.msgpack and steps.jsonl hold (the newer ones are left for the next look), and
TensorBoard, flushed every few steps, only up to its last flushed step.

With no RUN: makes a clean smoke run (no critical alert may fire) and short injected
runs (harness trainers, two at a time, in a harness temp dir), and checks that each
injection fires its alert within a few steps of its step (see `LIVE_RUNS`), then runs the
checks above on each of them. Result lines, JSON shape, exit codes, cancel: see
trainerd/verify/harness.py.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import time
from pathlib import Path

from protocol import catalogue
from protocol.events import ALERT_EVENTS
from protocol.jsonl import read_jsonl
from protocol.rundir import RunDirError, RunPaths, effective_status, read_events, read_manifest, resolve_run
from protocol.steplog import read_steplog
from protocol.text import safe_text
from trainerd.verify.harness import (
    CheckList,
    CouldNotFinish,
    CouldNotRun,
    Harness,
    Trainer,
    check_step_log,
    run_check,
    run_parallel,
    same_value,
)

__all__ = ["same_value", "Checks", "check_run", "load_tensorboard", "LIVE_RUNS", "run"]

ALERT_FIELDS = ("rule", "metric", "value", "threshold", "first_step", "explanation")


class Checks(CheckList):
    """Prints each result as it lands (stdout, or stderr under --json)."""

    def __init__(self, as_json: bool = False):
        super().__init__(
            "m3", lambda line: print(safe_text(line), file=sys.stderr if as_json else sys.stdout, flush=True)
        )


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


def _last_step(records: list[dict]) -> int:
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)


# -- checks on one run dir --------------------------------------------------------------


def check_run(paths: RunPaths, checks: CheckList, prefix: str = "") -> list[dict] | None:
    """Step-log, schema, mirror, TensorBoard and alert-event checks of one run; returns its records."""
    p = prefix
    lacks: set[str] = set()  # a run another framework wrote (adapters.RunLogger): fields it never logs
    try:  # read first: a run seen finished has complete files; one seen running is snapshotted
        manifest = read_manifest(paths)
        running = effective_status(manifest, paths) == "running"
        adapter = manifest.get("adapter")
        if isinstance(adapter, dict) and isinstance(adapter.get("missing"), list):
            lacks = {str(f) for f in adapter["missing"]}
    except RunDirError:
        running = False
    if not paths.steps.exists():
        checks.add(f"{p}step log", False, f"{paths.steps} does not exist")
        return None
    records, stats = read_steplog(paths.steps)
    mirror = read_jsonl(paths.steps_jsonl) if paths.steps_jsonl.exists() else None
    newer = 0
    if running and mirror is not None:
        # The consistent snapshot: the steps both logs hold (each is appended record by record).
        upto = min(_last_step(records), _last_step(mirror))
        all_records = records
        records = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= upto]
        mirror = [r for r in mirror if not isinstance(r.get("step"), int) or r["step"] <= upto]
        newer = len(all_records) - len(records)
    else:
        all_records = records
    if not check_step_log(checks, f"{p}step log", records, stats.corrupt_frames):
        if not records:
            return records
    if newer:
        checks.items[-1]["detail"] += f" (a running run: {newer} newer step(s) left for the next look)"

    # 1. schema: every catalogue field with the right type in every record
    lacked = {f"missing field {f!r}" for f in lacks}
    bad = [f"step {r.get('step')}: {prob}" for r in records for prob in catalogue.check_record(r) if prob not in lacked]
    nfields = len(catalogue.required_fields()) - len(lacks & set(catalogue.required_fields()))
    checks.add(
        f"{p}schema",
        not bad,
        f"{len(bad)} problem(s), first: {'; '.join(bad[:3])}"
        if bad
        else f"all {nfields} required catalogue fields present and typed in {len(records)} records"
        + (f" ({len(lacks)} the framework does not log: {', '.join(sorted(lacks))})" if lacks else ""),
    )

    # 2. JSONL mirror identical to the framed log, NaN / Inf included
    nonfinite = sum(1 for r in records for _ in _non_finite_fields(r))
    if mirror is None:
        checks.add(f"{p}jsonl mirror", False, f"{paths.steps_jsonl} does not exist")
    else:
        diffs = []
        if len(mirror) != len(records):
            diffs.append(f"{len(mirror)} JSONL records vs {len(records)} framed")
        for a, b in zip(records, mirror):
            if a.keys() != b.keys():
                diffs.append(f"step {a.get('step')}: keys differ ({sorted(set(a) ^ set(b))})")
                continue
            for k in a:
                if not same_value(a[k], b[k], any_nan=True):  # JSON text keeps no NaN payload
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
    _check_tensorboard(paths, records, checks, p, running, all_records)

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
    """tag -> {step: value} of every scalar in a tb/ dir (None if it holds no event files).
    A tb/ that is a link, and links inside it, are refused: nothing outside the run is read."""
    if tb_dir.is_symlink():
        raise RunDirError(f"{tb_dir} is a symbolic link; refusing to read through it")
    files = sorted(
        f
        for f in glob.glob(str(tb_dir / "**" / "events.out.tfevents.*"), recursive=True)
        if not any(p.is_symlink() for p in [Path(f), *Path(f).parents] if tb_dir in p.parents or p == Path(f))
    )
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


def _check_tensorboard(
    paths: RunPaths,
    records: list[dict],
    checks: CheckList,
    p: str,
    running: bool = False,
    all_records: list[dict] | None = None,
) -> None:
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
        pending = sum(1 for r in all_records or records if isinstance(r.get("step"), int) and r["step"] > last_tb)
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
                    if not same_value(x, got, any_nan=True):  # float32: NaN payloads do not survive
                        problems.append(f"step {step} {name}: {_fmt(x)} in the log, {_fmt(got)} in TensorBoard")
                elif not math.isfinite(got):
                    problems.append(f"step {step} {name}: {_fmt(x)} in the log, {_fmt(got)} in TensorBoard")
                elif name != "time" and abs(got - x) > 1e-3 * max(1.0, abs(x)):
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
TOTAL_BUDGET_S = 240.0  # all the live runs; a run still going at the deadline could not finish


def _expected(kind: str) -> tuple[str, ...]:
    from trainerd.tools.inject import EXPECTED_ALERTS

    return EXPECTED_ALERTS[kind]


def run_id_for(spec: str | None) -> str:
    return (spec or "clean").replace("@", "_at_")


def _live_run(runs_dir: Path, spec: str | None, deadline: float, h: Harness | None) -> tuple[int, str, float]:
    """One `trainerd start --smoke --foreground` (a harness trainer); (exit code, last log line, seconds).
    CouldNotFinish if it runs past its timeout or the budget's deadline."""
    run_id = run_id_for(spec)
    args = ["start", "--smoke", "--foreground", "--runs-dir", str(runs_dir), "--run-id", run_id]
    args += ["--steps", str(LIVE_STEPS), "--seed", str(LIVE_SEED)] + (["--inject", spec] if spec else [])
    t0 = time.monotonic()
    t = Trainer(args, runs_dir / f"{run_id}.log").start()
    try:
        rc = t.wait(min(RUN_TIMEOUT_S, deadline - time.monotonic()))
    except CouldNotFinish as e:
        raise CouldNotFinish(f"run {spec or 'clean'} {e} (time budget)") from None
    secs = time.monotonic() - t0
    if h is not None:
        h.progress(f"run {spec or 'clean'} ({LIVE_STEPS} steps) done in {secs:.1f}s, exit {rc}")
    return rc, t.tail(1), secs


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


def run_live(h: Harness, runs_dir: str | os.PathLike | None = None) -> None:
    """Make the clean and injected runs and check them: in a harness temp dir (removed at the
    end), or in `runs_dir` (kept) when given."""
    root = Path(runs_dir) if runs_dir is not None else h.tempdir()
    root.mkdir(parents=True, exist_ok=True)
    h.progress(f"{len(LIVE_RUNS)} runs of {LIVE_STEPS} smoke steps in {root}, two at a time")
    deadline = time.monotonic() + TOTAL_BUDGET_S
    made = run_parallel([lambda spec=spec: _live_run(root, spec, deadline, h) for spec, _ in LIVE_RUNS])
    outcomes = []
    for (spec, tol), (res, err) in zip(LIVE_RUNS, made):
        name = spec or "clean"
        if err is not None:
            if isinstance(err, CouldNotRun):
                raise err
            h.checks.could_not_finish(f"{name}: run", str(err))
            continue
        rc, last, _ = res
        paths = RunPaths(root / run_id_for(spec))
        if not paths.manifest.exists():
            h.checks.could_not_finish(f"{name}: run", f"the run did not start (exit {rc}): {last}")
            continue
        if spec is None:
            check_clean(paths, rc, h.checks, last)
        else:
            outcomes.append(check_injected(paths, spec, rc, tol, h.checks, last))
        check_run(paths, h.checks, prefix=f"{name}: ")
    if outcomes:
        h.progress(f"{'injection':<16} {'STEP':>4} {'fired':>6}  alert")
        for o in outcomes:
            h.progress(f"{o['kind']:<16} {o['injected_step']:>4} {str(o['fired_step']):>6}  {o['message']}")
    if runs_dir is not None:
        h.run = str(root)


def _verify(h: Harness, run: str | None, runs_dir) -> None:
    if run is None:
        return run_live(h, runs_dir)
    try:
        paths = resolve_run(run)
        read_manifest(paths)
    except RunDirError as e:
        raise CouldNotRun(str(e)) from None
    h.run = str(paths.root)
    h.progress(f"checking {paths.root}")
    check_run(paths, h.checks)


def run(run: str | None, as_json: bool = False, runs_dir: str | os.PathLike | None = None) -> int:
    """Entry point of `trainerd verify m3 [RUN] [--json]`. Without RUN, the live runs are made
    in a harness temp dir, or in `runs_dir` (kept) when given."""
    return run_check("m3", as_json, lambda h: _verify(h, run, runs_dir), run)
