"""`trainerd verify m1 [RUN] [--json]`: proof that runs are bitwise reproducible.

Without RUN, four short runs of one small config (`VERIFY_CONFIG`: 16 PPO steps, a
checkpoint every 5), each in its OWN process (`trainerd start --foreground`), two at a
time, one thread each:

  A  seed S            B  seed S             -> (a) same_seed_bitwise: every deterministic
                                                    field of every record bitwise equal
  C  another seed                            -> (b) other_seed_differs: the negative control
  D  seed S, SIGKILLed as soon as step 7 is logged (checkpoint 5 behind it), then
     `trainerd resume`                       -> (c) kill_resume_bitwise: resumed from the last
                                                    complete checkpoint, final log without gap
                                                    or duplicate (msgpack and JSONL), equal to A
                                                    bitwise, and its resume_check event says
                                                    identical

With RUN (a run dir, or a runs dir meaning its latest run), the checks above and then, on
that run: `<run_id>: step log` (no gap, no duplicate), `<run_id>: resume_check` (each such
event says identical), and `<run_id>: rerun_bitwise`: the run's resolved config and seed
from run.json are run again in a temp dir, in a fresh process, and its records are compared
bitwise with the run's own. A rerun needs the same torch version and device (else the check
fails saying why). It covers all of the run's steps when they fit in the time left of the
~3 minute budget (estimated from the run's own step times plus a warm-up allowance), else
the first N that fit (the detail says "the first N of M"); the rerun keeps the run's step
count, so the LR schedule is the same, and is stopped once it has written the N steps.

Exit 0 only if every check passed. Progress goes to stderr as it happens; with `--json`,
stdout gets exactly ONE JSON object:
{"check": "m1", "passed": bool, "checks": [{"name", "passed", "detail"}], "run": RUN|null,
 "duration_s": float}
SIGTERM (the monitor cancelling) ends the check at once, kills its trainer processes and
still prints the JSON object. TRAINERD_VERIFY_KEEP=1 keeps the runs' temp dir for a
post-mortem. About 22 s on an idle 2-core machine (without RUN).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from protocol import catalogue
from protocol.rundir import RunDirError, RunPaths, read_events, read_manifest, resolve_run
from protocol.steplog import StepLogTailer, read_steplog
from trainerd.run.resume_check import check_step_sequence, first_difference
from trainerd.verify.harness import CheckList

# The small config all the runs of the check share. The warm start and the reward model
# are shortened, not skipped (their training is part of what must be reproducible); 16
# PPO steps with checkpoints at 0, 5, 10, 15 and 16, so that a kill at step 7..9 leaves
# checkpoint 5 behind it and steps to recompute. dropout > 0 (the default is 0) so that
# the global torch RNG, which only dropout draws from, is exercised by the checks too.
VERIFY_STEPS = 16
VERIFY_CHECKPOINT_EVERY = 5
VERIFY_CONFIG: dict = dict(
    preset="default",
    steps=VERIFY_STEPS,
    checkpoint_every=VERIFY_CHECKPOINT_EVERY,
    threads=1,
    device="cpu",
    n_prompts=256,
    sft_steps=20,
    sft_batch_size=32,
    rm_steps=20,
    rm_batch_size=32,
    batch_size=32,
    minibatch_size=16,
    ppo_epochs=2,
    lr_warmup_steps=3,
    dropout=0.1,
)
SEED = 1234
OTHER_SEED = 4321
# The killed run D is SIGKILLed as soon as a record at or after this step is written:
# two steps past the first periodic checkpoint, so the resume recomputes >= 2 steps.
KILL_AT_STEP = VERIFY_CHECKPOINT_EVERY + 2
RUN_TIMEOUT_S = 150.0  # one trainer process; far above what a run here takes (~10 s)
TOTAL_BUDGET_S = 170.0  # the whole check stays under 3 minutes


def _log(msg: str, t0: float) -> None:
    print(f"[verify m1 {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Checks(CheckList):
    def __init__(self, t0: float):
        super().__init__(lambda line: _log(line, t0))
        self.t0 = t0


# -- running the trainer in a separate process ------------------------------------------------


def toml_value(v) -> str:
    """A TOML literal for a flat config value (str, bool, int, float incl. inf/nan)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-tripping form, valid TOML (1e-05, 0.1, 3.0)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_config_toml(path: Path, config: dict) -> Path:
    """Write a flat TOML config; None values are left out (None is every optional key's default)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


# The CLI's entry point, run by the same interpreter as this process (so the runs use this
# torch and this kit, whether or not the `trainerd` script is on PATH).
CLI_MAIN = "from trainerd.cli import main; main()"


def _trainerd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI_MAIN, *args]


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # one thread each: the runs go two at a time on 2 cores
    env.pop("SEED", None)  # the seed comes from the config, never from the caller's shell
    if extra:
        env.update(extra)
    return env


_LIVE: set[TrainerProcess] = set()  # children to SIGKILL if verify itself is interrupted
_LIVE_LOCK = threading.Lock()
_CANCELLED = threading.Event()  # set when verify is interrupted: start no more trainers


@dataclass(eq=False)
class TrainerProcess:
    """One `trainerd ... --foreground` child in its own session (so a SIGKILL of its process
    group reaches anything it started), output to a log file."""

    args: list[str]
    log_path: Path
    env: dict = field(default_factory=_child_env)
    proc: subprocess.Popen | None = None

    def start(self) -> TrainerProcess:
        # Under the lock, so an interrupt either sees this child in _LIVE or stops it starting.
        with _LIVE_LOCK:
            if _CANCELLED.is_set():
                raise RunFailed("verify m1 was interrupted")
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                _trainerd_cmd(*self.args),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
            _LIVE.add(self)
        return self

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the trainer's whole process group (it may have children)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])


def start_args(runs_dir: Path, run_id: str, config_path: Path, seed: int) -> list[str]:
    return [
        "start",
        "--foreground",
        "--config",
        str(config_path),
        "--seed",
        str(seed),
        "--runs-dir",
        str(runs_dir),
        "--run-id",
        run_id,
    ]


class RunFailed(Exception):
    """A trainer process did not do what the check needed; the message says what and why."""


def kill_all_children() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for p in live:
        p.kill()


def run_to_end(
    runs_dir: Path, run_id: str, config_path: Path, seed: int, timeout: float = RUN_TIMEOUT_S, env: dict | None = None
) -> RunPaths:
    log = runs_dir / f"{run_id}.out"
    p = TrainerProcess(start_args(runs_dir, run_id, config_path, seed), log, env or _child_env()).start()
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"run {run_id} did not finish in {timeout:.0f} s") from None
    if rc != 0:
        raise RunFailed(f"run {run_id} exited {rc}: {p.tail()}")
    return RunPaths(runs_dir / run_id)


def _checkpoint_steps(paths: RunPaths) -> list[int]:
    """Steps of the complete checkpoints (the trainer renames a finished temp dir to step_NNNNNN)."""
    out = []
    try:
        for d in paths.checkpoints.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit():
                out.append(int(d.name[5:]))
    except OSError:
        pass
    return sorted(out)


def run_killed_at(
    runs_dir: Path,
    run_id: str,
    config_path: Path,
    seed: int,
    kill_at_step: int,
    timeout: float = RUN_TIMEOUT_S,
    env: dict | None = None,
) -> tuple[RunPaths, int]:
    """Start a run and SIGKILL it as soon as its step log holds a record at or after
    `kill_at_step`; returns (paths, last step written before the kill)."""
    log = runs_dir / f"{run_id}.out"
    paths = RunPaths(runs_dir / run_id)
    p = TrainerProcess(start_args(runs_dir, run_id, config_path, seed), log, env or _child_env()).start()
    tailer = StepLogTailer(paths.steps)
    last = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            for rec in tailer.poll():
                if isinstance(rec.get("step"), int):
                    last = max(last, rec["step"])
            if last >= kill_at_step:
                p.kill()
                break
            if p.proc.poll() is not None:
                raise RunFailed(
                    f"run {run_id} exited {p.proc.returncode} at step {last} before it could be "
                    f"killed at step {kill_at_step}: {p.tail()}"
                )
            if time.monotonic() > deadline:
                p.kill()
                raise RunFailed(f"run {run_id} did not reach step {kill_at_step} in {timeout:.0f} s")
            time.sleep(0.005)
    finally:
        p.kill()
        p._log.close()
    # The kill may land after more records were written; count them all.
    records, _ = read_steplog(paths.steps)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return paths, max(steps) if steps else 0


def resume(
    paths: RunPaths, timeout: float = RUN_TIMEOUT_S, extra_args: tuple[str, ...] = (), env: dict | None = None
) -> tuple[int, str]:
    """`trainerd resume RUN --foreground`; returns (exit code, last lines of its output)."""
    log = paths.root.parent / f"{paths.run_id}.resume.out"
    p = TrainerProcess(["resume", str(paths.root), "--foreground", *extra_args], log, env or _child_env()).start()
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        return -1, f"resume did not finish in {timeout:.0f} s"
    return rc, p.tail()


def records_of(paths: RunPaths) -> list[dict]:
    records, _ = read_steplog(paths.steps)
    return records


# -- the checks --------------------------------------------------------------------------------


def check_same_seed(checks: Checks, a: RunPaths, b: RunPaths) -> list[dict] | None:
    ra, rb = records_of(a), records_of(b)
    name = "same_seed_bitwise"
    if len(ra) != VERIFY_STEPS or len(rb) != VERIFY_STEPS:
        checks.add(name, False, f"expected {VERIFY_STEPS} records per run, got {len(ra)} and {len(rb)}")
        return ra
    d = first_difference(ra, rb, a_name="run_a", b_name="run_b")
    if d is not None:
        checks.add(name, False, f"two processes, seed {SEED}, differ at {d.describe()}")
    else:
        n_fields = len(catalogue.deterministic_fields())
        checks.add(
            name, True, f"two processes, seed {SEED}: {len(ra)} steps x {n_fields} deterministic fields bitwise equal"
        )
    return ra


def check_other_seed(checks: Checks, ra: list[dict], c: RunPaths) -> None:
    rc = records_of(c)
    name = "other_seed_differs"
    if not rc:
        checks.add(name, False, "the other-seed run wrote no records")
        return
    d = first_difference(ra, rc, steps=[r["step"] for r in rc], a_name=f"seed_{SEED}", b_name=f"seed_{OTHER_SEED}")
    if d is None:
        checks.add(
            name,
            False,
            f"seed {OTHER_SEED} gave bitwise the same records as seed {SEED}: "
            f"the seed does not reach the run, so check (a) proves nothing",
        )
    else:
        checks.add(name, True, f"seed {OTHER_SEED} differs from seed {SEED} (first at {d.describe()})")


def check_kill_resume(
    checks: Checks, ra: list[dict], d: RunPaths, killed_at: int, ckpts: list[int], rc: int, out: str
) -> None:
    name = "kill_resume_bitwise"
    if rc != 0:
        checks.add(name, False, f"resume after SIGKILL (after step {killed_at}) exited {rc}: {out}")
        return
    rd = records_of(d)
    problems = []
    seq = check_step_sequence(rd)
    if seq:
        problems.append(f"step log: {seq}")
    try:
        from protocol.jsonl import read_jsonl

        seq_jsonl = check_step_sequence(read_jsonl(d.steps_jsonl))
        if seq_jsonl:
            problems.append(f"steps.jsonl: {seq_jsonl}")
    except OSError as e:  # pragma: no cover
        problems.append(f"steps.jsonl unreadable: {e}")
    diff = first_difference(ra, rd, a_name="uninterrupted", b_name="resumed")
    if diff is not None:
        problems.append(f"differs from the uninterrupted run at {diff.describe()}")
    events = read_events(d)
    resumed = [e for e in events if e.get("event") == "resumed"]
    checks_ev = [e for e in events if e.get("event") == "resume_check"]
    last_complete = max(ckpts) if ckpts else None
    if len(resumed) != 1 or resumed[0].get("step") != last_complete:
        problems.append(
            f"expected one resume from the last complete checkpoint {last_complete}, "
            f"got resumed events at {[e.get('step') for e in resumed]}"
        )
    if not checks_ev:
        problems.append("no resume_check event in events.jsonl")
    else:
        ev = checks_ev[-1]
        if ev.get("result") != "identical" or not ev.get("complete", False):
            problems.append(f"resume_check event says {ev.get('result')!r}: {ev.get('message', '')}")
    if problems:
        checks.add(name, False, f"SIGKILL after step {killed_at} was logged, resumed: " + "; ".join(problems))
        return
    ev = checks_ev[-1]
    from_step = ev.get("resumed_from", resumed[-1].get("step") if resumed else "?")
    checks.add(
        name,
        True,
        f"SIGKILL after step {killed_at} was logged, resumed from checkpoint {from_step}: steps "
        f"{ev.get('compared_from')}..{ev.get('compared_to')} recomputed identical "
        f"(resume_check event), final log {len(rd)} steps without gap or duplicate, "
        f"bitwise equal to the uninterrupted run",
    )


# -- RUN: rerun a given run ----------------------------------------------------------------------


def _rerun_budget_steps(records: list[dict], budget_s: float, warmup_s: float = 15.0) -> int:
    """How many of a run's steps a rerun can redo within `budget_s` (from its step times)."""
    total = warmup_s
    n = 0
    for r in sorted(records, key=lambda r: r.get("step", 0)):
        t = r.get("step_time_s")
        total += t if isinstance(t, float) and math.isfinite(t) else 1.0
        if total > budget_s:
            break
        n += 1
    return n


def _cannot_rerun_here(manifest: dict) -> str | None:
    """Why this machine cannot rerun the run bitwise (another torch, no such device), or None."""
    import torch  # only here: verify m1 without RUN never needs torch in this process

    det = manifest.get("determinism") or {}
    if det.get("torch_version") and det["torch_version"] != torch.__version__:
        return f"the run used torch {det['torch_version']}, this machine has {torch.__version__}"
    device = str(det.get("device") or (manifest.get("config") or {}).get("device") or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"the run used {device}, this machine has no CUDA"
    return None


def check_given_run(checks: Checks, run: str, work: Path, t0: float, budget_s: float) -> None:
    try:
        paths = RunPaths(resolve_run(run).root.resolve())  # `latest` -> the run it names
        manifest = read_manifest(paths)
    except RunDirError as e:
        checks.add("given_run", False, str(e))
        return
    label = paths.run_id
    records = records_of(paths)
    seq = check_step_sequence(records)
    checks.add(
        f"{label}: step log",
        not seq and bool(records),
        seq or (f"{len(records)} steps without gap or duplicate" if records else "no records"),
    )
    for ev in (e for e in read_events(paths) if e.get("event") == "resume_check"):
        checks.add(
            f"{label}: resume_check",
            ev.get("result") in ("identical", "nothing_to_compare"),
            str(ev.get("message", ev.get("result"))),
        )
    if not records:
        return
    config = manifest.get("config")
    seed = manifest.get("seed")
    if not isinstance(config, dict) or not isinstance(seed, int):
        checks.add(f"{label}: rerun", False, "run.json lacks the resolved config or the seed")
        return
    why_not = _cannot_rerun_here(manifest)
    if why_not:
        checks.add(f"{label}: rerun", False, f"cannot be reproduced bitwise on this machine: {why_not}")
        return
    n = min(len(records), _rerun_budget_steps(records, budget_s))
    if n < 1:
        checks.add(f"{label}: rerun", False, f"its steps are too slow to rerun any within {budget_s:.0f} s")
        return
    cfg = {"preset": "default", **{k: v for k, v in config.items() if k != "seed"}}
    config_path = write_config_toml(work / f"{label}.toml", cfg)
    runs_dir = work / "rerun"
    runs_dir.mkdir()
    _log(f"rerunning {label} (seed {seed}) in a fresh process for its first {n} of {len(records)} steps", t0)
    try:
        if n >= len(records) and manifest.get("status") == "finished":
            rerun = run_to_end(runs_dir, "rerun", config_path, seed, timeout=budget_s + 30)
        else:
            # The config keeps the run's own step count (the LR schedule depends on it);
            # the rerun is stopped once it has written the steps to compare.
            rerun, _ = run_killed_at(runs_dir, "rerun", config_path, seed, n, timeout=budget_s + 30)
    except RunFailed as e:
        checks.add(f"{label}: rerun", False, str(e))
        return
    steps = [r["step"] for r in sorted(records, key=lambda r: r["step"])][:n]
    d = first_difference(records, records_of(rerun), steps=steps, a_name="run", b_name="rerun")
    scope = "all" if n == len(records) else f"the first {n} (time budget) of"
    checks.add(
        f"{label}: rerun_bitwise",
        d is None,
        f"{scope} {len(records)} steps bitwise equal to a fresh rerun"
        if d is None
        else f"rerun differs at {d.describe()}",
    )


# -- entry point ------------------------------------------------------------------------------------


def run(run: str | None, as_json: bool) -> int:
    t0 = time.monotonic()
    checks = Checks(t0)
    _CANCELLED.clear()
    work = Path(tempfile.mkdtemp(prefix="verify-m1-"))
    keep = os.environ.get("TRAINERD_VERIFY_KEEP") == "1"  # keep the runs for a post-mortem
    previous = _on_sigterm_exit()
    try:
        _verify(checks, run, work, t0)
    except (KeyboardInterrupt, SystemExit):
        checks.add("verify_m1", False, "interrupted")
    except Exception as e:  # a bug here must still give one JSON object and a failing exit
        checks.add("verify_m1", False, f"internal error: {type(e).__name__}: {e}")
    finally:
        kill_all_children()  # never leave trainers running behind an interrupted check
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if keep:
            _log(f"runs kept in {work}", t0)
        else:
            shutil.rmtree(work, ignore_errors=True)
    duration = time.monotonic() - t0
    _log(f"{'PASSED' if checks.passed else 'FAILED'} in {duration:.1f} s", t0)
    if as_json:
        print(
            json.dumps(
                {
                    "check": "m1",
                    "passed": checks.passed,
                    "checks": checks.items,
                    "run": run,
                    "duration_s": round(duration, 2),
                }
            )
        )
    return 0 if checks.passed else 1


def _on_sigterm_exit():
    """SIGTERM (the monitor cancelling a check) ends the check through `finally`, which kills
    the trainer children; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(143)

    return signal.signal(signal.SIGTERM, handler)


def _verify(checks: Checks, run: str | None, work: Path, t0: float) -> None:
    if run is not None:  # a bad RUN is a user error: say so at once, before minutes of runs
        try:
            read_manifest(resolve_run(run))
        except RunDirError as e:
            checks.add("given_run", False, str(e))
            return
    runs_dir = work / "runs"
    runs_dir.mkdir()
    config_path = write_config_toml(work / "verify_m1.toml", VERIFY_CONFIG)
    _log(
        f"config: {VERIFY_STEPS} PPO steps, checkpoint every {VERIFY_CHECKPOINT_EVERY}, one thread per "
        f"process, two processes at a time; work dir {work}",
        t0,
    )

    def job_run(run_id: str, seed: int):
        _log(f"start {run_id} (seed {seed}) in its own process", t0)
        paths = run_to_end(runs_dir, run_id, config_path, seed)
        _log(f"{run_id} finished", t0)
        return paths

    def job_kill_resume():
        _log(f"start run_d (seed {SEED}); SIGKILL it at step {KILL_AT_STEP}", t0)
        paths, killed_at = run_killed_at(runs_dir, "run_d", config_path, SEED, KILL_AT_STEP)
        ckpts = _checkpoint_steps(paths)  # the complete ones when it died
        _log(f"run_d killed after step {killed_at} (complete checkpoints {ckpts}); `trainerd resume`", t0)
        rc, out = resume(paths)
        _log(f"run_d resumed and exited {rc}", t0)
        return paths, killed_at, ckpts, rc, out

    # Two workers: A and B together (the pair whose equality is the point, in separate
    # processes at the same time), then D (kill + resume, the longest job) beside C.
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        fa = pool.submit(job_run, "run_a", SEED)
        fb = pool.submit(job_run, "run_b", SEED)
        fd = pool.submit(job_kill_resume)
        fc = pool.submit(job_run, "run_c", OTHER_SEED)
        ra = None
        try:
            ra = check_same_seed(checks, fa.result(), fb.result())
        except RunFailed as e:
            checks.add("same_seed_bitwise", False, str(e))
        try:
            c = fc.result()
            if ra is not None:
                check_other_seed(checks, ra, c)
            else:
                checks.add("other_seed_differs", False, "no reference run to compare with")
        except RunFailed as e:
            checks.add("other_seed_differs", False, str(e))
        try:
            d, killed_at, ckpts, rc, out = fd.result()
            if ra is not None:
                check_kill_resume(checks, ra, d, killed_at, ckpts, rc, out)
            else:
                checks.add("kill_resume_bitwise", False, "no reference run to compare with")
        except RunFailed as e:
            checks.add("kill_resume_bitwise", False, str(e))
    except BaseException:
        _CANCELLED.set()  # no new trainer starts, queued jobs are dropped ...
        kill_all_children()  # ... and the running ones are unblocked before leaving
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if run is not None:
        remaining = TOTAL_BUDGET_S - (time.monotonic() - t0)
        check_given_run(checks, run, work, t0, budget_s=max(remaining, 20.0))
