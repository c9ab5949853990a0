"""Alert quality (`make bench`): how often the default alert rules cry wolf on clean runs, and
how fast they catch each injected fault.

Two measurements, each for the rules as they were before the floors/warm-ups (BASELINE) and
for today's `protocol.alerts.DEFAULT_RULES`:

1. False alarms: clean runs (several seeds, smoke and default configs; plus the steps before a
   late injection, which are the clean run of that seed) replayed through a fresh `AlertEngine`;
   every `alert` event is one false alarm of its rule and severity, and
   an `alert_escalated` to critical counts as one critical false alarm. Reported per 1,000
   clean steps. Target: no critical, at most one warning per 1,000 steps (all rules together).
2. Detection delay: runs with a fault injected (`--inject KIND@STEP`, seed 0, mostly the smoke
   config; early and late in the run); the delay is the steps from the injection to the first
   `alert`/`alert_escalated` of one of the kind's expected rules
   (`trainerd.tools.inject.EXPECTED_ALERTS`). Target: no slower than before (`target_delay`:
   MAX_DELAY at the usual steps, the BASELINE rules' delay on the same log elsewhere).

Where the step logs come from:
    alert_quality.py                 run the trainer (one run at a time, ~25 min on 2 cores) into a
                                     temp dir, then replay; --quick: fewer, shorter runs (~6 min)
    alert_quality.py --runs-dir D    ...into D, reusing runs already there (same run ids)
    alert_quality.py --replay D      replay the runs already in D (run ids clean_* and inj_KIND_STEP)
    alert_quality.py --fixtures      replay the committed logs of tests/fixtures/alert_quality
                                     (seconds; what tests/trainerd/test_alert_quality.py checks)
    alert_quality.py --make-fixtures D   write stripped, gzipped copies of D's runs as the fixtures
Exit 1 if today's rules miss a target.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ["OMP_NUM_THREADS"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.alerts import DEFAULT_RULES, AlertEngine, Rule  # noqa: E402
from protocol.steplog import encode_frame, read_steplog  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "alert_quality"

# The rules as they were before "alerts worth reading": no absolute floor under the gradient
# spike, kl_runaway on a single step over 0.2 with no warm-up, the old kl_control band.
BASELINE_OVERRIDES: dict[str, dict[str, Any]] = {
    "exploding_gradients": {"spike_floor": 0.0},
    "entropy_collapse": {"spike_factor": None, "spike_floor": 0.0},
    "kl_runaway": {
        "consecutive": 1,
        "clear_threshold": 0.18,
        "clear_consecutive": 3,
        "warmup_steps": 0,
        "hard_threshold": None,
        "pushback": None,
    },
    "kl_control": {
        "threshold": 0.15,
        "clear_threshold": 0.12,
        "consecutive": 3,
        "clear_consecutive": 3,
        "warmup_steps": 0,
        "relative_to": None,
    },
}


def baseline_rules() -> tuple[Rule, ...]:
    """The rules as they were: today's defaults with BASELINE_OVERRIDES."""
    return tuple(replace(r, **BASELINE_OVERRIDES.get(r.name, {})) for r in DEFAULT_RULES)


# Clean runs: (preset, seed, steps). Injected runs: the spec, and the steps the run lasts.
CLEAN_RUNS: tuple[tuple[str, int, int], ...] = (
    ("smoke", 1, 2000),
    ("smoke", 2, 1000),
    ("default", 0, 600),
    ("default", 1, 600),
)
INJECTED_RUNS: tuple[tuple[str, int, str], ...] = (
    ("reward_hack@1", 60, "smoke"),
    ("kl_blowup@5", 60, "smoke"),
    ("entropy_collapse@8", 400, "smoke"),  # long: the collapsed policy's tiny gradient norms
    ("grad_explode@8", 60, "smoke"),
    ("nan@8", 60, "smoke"),
    ("reward_hack@100", 200, "smoke"),
    ("kl_blowup@100", 200, "smoke"),
    ("entropy_collapse@100", 200, "smoke"),
    ("grad_explode@100", 200, "smoke"),
    ("nan@100", 200, "smoke"),
    ("kl_blowup@300", 450, "smoke"),
    ("kl_blowup@300", 400, "default"),
)
# --quick (`make bench`, ~6 min on 2 cores): one long clean run of each config, the usual injections.
QUICK_CLEAN = (("smoke", 1, 1000), ("default", 0, 600))
QUICK_INJECTED = tuple((spec, min(steps, 60), preset) for spec, steps, preset in INJECTED_RUNS[:5])
EXPECTED = {
    "kl_blowup": ("kl_runaway", "kl_control"),
    "entropy_collapse": ("entropy_collapse",),
    "grad_explode": ("exploding_gradients",),
    "nan": ("non_finite",),
    "reward_hack": ("reward_hacking",),
}  # = trainerd.tools.inject.EXPECTED_ALERTS but its data-parallel kinds (kept here so replaying needs no torch)
# The delays measured before this change (smoke config, seed 0, each kind at its usual step),
# which must not get worse; an injection at another step must be caught no later than the
# BASELINE rules catch it on the same log (`target_delay`).
MAX_DELAY = {"reward_hack": 21, "kl_blowup": 1, "entropy_collapse": 1, "grad_explode": 0, "nan": 0}
MAX_WARNINGS_PER_1000 = 1.0
MIN_CLEAN_PREFIX = 50  # an injection later than this: the steps before it count as clean steps too
MAX_CRITICAL_PER_1000 = 0.0

# Fields the fixtures keep: every metric a default rule reads, and the step.
KEEP_FIELDS = sorted(
    {"step"}
    | {
        m
        for r in DEFAULT_RULES
        for m in (r.metric, *r.metrics, r.critical_factor_of, r.only_without, r.relative_to, r.pushback)
        if m is not None
    }
)


# -- step logs --------------------------------------------------------------------------------


def clean_id(preset: str, seed: int, steps: int) -> str:
    return f"clean_{preset}_seed{seed}_{steps}"


def inject_id(spec: str, preset: str = "smoke") -> str:
    return "inj_" + spec.replace("@", "_") + ("" if preset == "smoke" else f"_{preset}")


def parse_inject_id(run_id: str) -> tuple[str, int, str] | None:
    """'inj_kl_blowup_300_default' -> ('kl_blowup', 300, 'default'); the preset defaults to smoke."""
    if not run_id.startswith("inj_"):
        return None
    parts = run_id[4:].split("_")
    i = next(i for i, p in enumerate(parts) if p.isdigit())
    return "_".join(parts[:i]), int(parts[i]), "_".join(parts[i + 1 :]) or "smoke"


def load_records(path: Path) -> list[dict[str, Any]]:
    """A step log's records: a run's steps.msgpack, or a gzipped copy (the fixtures)."""
    path = Path(path)
    if path.suffix != ".gz":
        return read_steplog(path)[0]
    with tempfile.TemporaryDirectory(prefix="alert-quality-") as tmp:
        plain = Path(tmp) / "steps.msgpack"
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        return read_steplog(plain)[0]


def write_fixture(records: list[dict[str, Any]], path: Path) -> None:
    """The records, stripped to KEEP_FIELDS, as a gzipped step log (mtime 0: reproducible bytes)."""
    frames = b"".join(encode_frame({k: r[k] for k in KEEP_FIELDS if k in r}) for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(frames)


def run_trainer(runs_dir: Path, run_id: str, preset: str, seed: int, steps: int, inject: str | None) -> Path:
    """One foreground trainer run (skipped when the run already finished); its steps.msgpack."""
    run = runs_dir / run_id
    steps_file = run / "steps.msgpack"
    if steps_file.exists() and len(load_records(steps_file)) >= steps:
        return steps_file
    if run.exists():
        shutil.rmtree(run)
    runs_dir.mkdir(parents=True, exist_ok=True)
    cfg = runs_dir / f"{preset}.toml"
    # no profiler window, few checkpoints: the metrics are the same, the run is quicker
    cfg.write_text(
        (f'preset = "{preset}"\n' if preset != "default" else "") + 'profile_steps = ""\ncheckpoint_every = 500\n'
    )
    cmd = [sys.executable, "-m", "trainerd", "start", "--foreground", "--config", str(cfg), "--seed", str(seed)]
    cmd += ["--steps", str(steps), "--runs-dir", str(runs_dir), "--run-id", run_id]
    if inject:
        cmd += ["--inject", inject]
    t0 = time.monotonic()
    print(f"  running {run_id} ({steps} steps)...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not steps_file.exists():
        raise SystemExit(f"alert_quality: {run_id} did not start (exit {p.returncode}): {p.stderr.strip()[-300:]}")
    print(f"  {run_id} done in {time.monotonic() - t0:.0f}s (exit {p.returncode})", file=sys.stderr, flush=True)
    return steps_file


# -- measurement ------------------------------------------------------------------------------


@dataclass
class FalseAlarms:
    steps: int = 0
    fired: Counter = field(default_factory=Counter)  # (rule, severity) -> alerts fired or escalated
    examples: dict = field(default_factory=dict)  # (rule, severity) -> first message

    def per_1000(self, severity: str | None = None) -> float:
        n = sum(v for (_, sev), v in self.fired.items() if severity is None or sev == severity)
        return 1000.0 * n / self.steps if self.steps else 0.0


def false_alarms(logs: dict[str, list[dict[str, Any]]], rules: tuple[Rule, ...]) -> FalseAlarms:
    out = FalseAlarms()
    for name, records in logs.items():
        eng = AlertEngine(rules)
        out.steps += len(records)
        for rec in records:
            for ev, a in eng.update(rec):
                if ev == "alert" or (ev == "alert_escalated" and a.severity == "critical"):
                    key = (a.rule, a.severity if ev == "alert" else "critical")
                    out.fired[key] += 1
                    out.examples.setdefault(key, f"{name} step {rec['step']}: {a.message()}")
    return out


@dataclass
class Detection:
    kind: str
    step: int  # the injection step
    delay: int | None  # None: never caught
    rule: str | None = None
    message: str = ""
    others: Counter = field(default_factory=Counter)  # other rules fired after the injection


def detection(kind: str, inj_step: int, records: list[dict[str, Any]], rules: tuple[Rule, ...]) -> Detection:
    eng = AlertEngine(rules)
    found = Detection(kind, inj_step, None)
    for rec in records:
        for ev, a in eng.update(rec):
            if ev == "alert_cleared" or rec["step"] < inj_step:
                continue
            if a.rule in EXPECTED[kind]:
                if found.delay is None:
                    found.delay, found.rule, found.message = rec["step"] - inj_step, a.rule, a.message()
            else:
                found.others[(a.rule, a.severity)] += 1
    return found


def target_delay(kind: str, inj_step: int, records: list[dict[str, Any]]) -> int:
    """The delay today's rules must meet: the BASELINE rules' delay on the same log (what users
    had; at the usual steps that is MAX_DELAY); MAX_DELAY where the baseline never caught it."""
    before = detection(kind, inj_step, records, baseline_rules()).delay
    return MAX_DELAY[kind] if before is None else before


# -- report -----------------------------------------------------------------------------------


def clean_steps(clean: dict[str, list[dict]], injected: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The clean runs, plus the steps before each late injection (a run is bitwise the clean run
    of its seed and config up to its injection step): more seeds' and configs' early phases."""
    prefixes: dict[tuple, tuple[str, list[dict]]] = {}  # the same seed's clean steps count once
    for name, records in injected.items():
        parsed = parse_inject_id(name)
        if parsed and parsed[1] > MIN_CLEAN_PREFIX:
            before = [r for r in records if r["step"] < parsed[1]]
            key = tuple(r.get("kl") for r in before[:MIN_CLEAN_PREFIX])
            if key not in prefixes or len(prefixes[key][1]) < len(before):
                prefixes[key] = (f"{name}[:{parsed[1] - 1}]", before)
    return {**clean, **dict(prefixes.values())}


def report(clean: dict[str, list[dict]], injected: dict[str, list[dict]], verbose: bool = True) -> bool:
    """Print the table; True if today's rules meet every target."""
    sets = (("before", baseline_rules()), ("after", DEFAULT_RULES))
    clean = clean_steps(clean, injected)
    fa = {label: false_alarms(clean, rules) for label, rules in sets}
    steps = fa["after"].steps
    print(
        f"False alarms per 1,000 clean steps ({steps} steps: {', '.join(f'{k} ({len(v)})' for k, v in clean.items())})"
    )
    keys = sorted(set(fa["before"].fired) | set(fa["after"].fired))
    print(f"  {'rule':24} {'severity':9} {'before':>8} {'after':>8}")
    for rule, sev in keys:
        b, a = (1000.0 * fa[x].fired[(rule, sev)] / steps for x in ("before", "after"))
        print(f"  {rule:24} {sev:9} {b:8.2f} {a:8.2f}")
    for sev, target in (("warning", MAX_WARNINGS_PER_1000), ("critical", MAX_CRITICAL_PER_1000)):
        b, a = fa["before"].per_1000(sev), fa["after"].per_1000(sev)
        print(f"  {'ALL':24} {sev:9} {b:8.2f} {a:8.2f}   target <= {target:g}")
    if verbose:
        for key, msg in sorted(fa["after"].examples.items()):
            print(f"    after, {key[0]} ({key[1]}) e.g. {msg[:220]}")
    ok = fa["after"].per_1000("warning") <= MAX_WARNINGS_PER_1000 and fa["after"].per_1000("critical") <= 0
    print()
    print("Detection delay (steps from the injection to the first alert of the expected rule)")
    print(f"  {'fault':22} {'before':>7} {'after':>7} {'target':>7}  first alert (after); other alerts after it")
    for name, records in injected.items():
        kind, inj_step, preset = parse_inject_id(name) or ("?", 0, "?")
        res = {label: detection(kind, inj_step, records, rules) for label, rules in sets}
        d = {k: ("missed" if v.delay is None else str(v.delay)) for k, v in res.items()}
        target = target_delay(kind, inj_step, records)
        good = res["after"].delay is not None and res["after"].delay <= target
        ok = ok and good
        fault = f"{kind}@{inj_step}" + ("" if preset == "smoke" else f" ({preset})")
        print(
            f"  {fault:22} {d['before']:>7} {d['after']:>7} {'<=' + str(target):>7}  "
            f"{'' if good else 'MISSED TARGET '}{res['after'].rule or '-'}"
        )
        if verbose:
            if res["after"].message:
                print(f"      {res['after'].message[:230]}")
            for label in ("before", "after"):
                if res[label].others:
                    others = ", ".join(f"{r} {s} x{n}" for (r, s), n in sorted(res[label].others.items()))
                    print(f"      {label}: also {others}")
    print()
    print("PASS" if ok else "FAIL: today's rules miss a target")
    return ok


def load_fixtures(where: Path = FIXTURES) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    clean, injected = {}, {}
    for p in sorted(where.glob("*.msgpack.gz")):
        name = p.name.removesuffix(".msgpack.gz")
        (injected if name.startswith("inj_") else clean)[name] = load_records(p)
    return clean, injected


def load_runs(runs_dir: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    clean, injected = {}, {}
    for run in sorted(runs_dir.iterdir()):
        if (run / "steps.msgpack").exists() and run.name.startswith(("clean_", "inj_")):
            (injected if run.name.startswith("inj_") else clean)[run.name] = load_records(run / "steps.msgpack")
    return clean, injected


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fixtures", action="store_true", help="replay the committed logs only (no trainer)")
    ap.add_argument("--runs-dir", type=Path, help="where the runs go (reused when already there)")
    ap.add_argument("--replay", type=Path, metavar="RUNS_DIR", help="replay the clean_*/inj_* runs in RUNS_DIR only")
    ap.add_argument("--make-fixtures", type=Path, metavar="RUNS_DIR", help="write the fixtures from RUNS_DIR's runs")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter live runs (make bench)")
    ap.add_argument("--quiet", action="store_true", help="the table only")
    args = ap.parse_args(argv)
    if args.make_fixtures:
        for run in sorted(p for p in args.make_fixtures.iterdir() if (p / "steps.msgpack").exists()):
            if run.name.startswith(("clean_", "inj_")):
                recs = load_records(run / "steps.msgpack")
                write_fixture(recs, FIXTURES / f"{run.name}.msgpack.gz")
                print(f"{run.name}: {len(recs)} records -> {FIXTURES / run.name}.msgpack.gz")
        return 0
    if args.fixtures or args.replay:
        clean, injected = load_fixtures() if args.fixtures else load_runs(args.replay)
        return 0 if report(clean, injected, verbose=not args.quiet) else 1
    tmp = None
    runs = args.runs_dir
    if runs is None:
        runs = Path(tmp := tempfile.mkdtemp(prefix="alert-quality-"))
    try:
        clean = {}
        for preset, seed, steps in QUICK_CLEAN if args.quick else CLEAN_RUNS:
            rid = clean_id(preset, seed, steps)
            clean[rid] = load_records(run_trainer(runs, rid, preset, seed, steps, None))
        injected = {}
        for spec, steps, preset in QUICK_INJECTED if args.quick else INJECTED_RUNS:
            rid = inject_id(spec, preset)
            injected[rid] = load_records(run_trainer(runs, rid, preset, 0, steps, spec))
        return 0 if report(clean, injected, verbose=not args.quiet) else 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
