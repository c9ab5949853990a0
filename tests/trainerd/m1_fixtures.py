"""Helpers shared by the M1 tests (determinism, resume, verify m1).

Every trainer run here is a separate `trainerd` process (as a user runs it), on the
small config `trainerd verify m1` uses. Runs are made once per test process and shared
(`reference_run`, `scenario`), two at a time, one thread each.

Test-only faults are injected WITHOUT any hook in the product code: the child process
is started through a bootstrap (`python -c "<patch>; main()"`) that monkeypatches one
function of the trainer before the CLI runs. Nothing a user can set reaches them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from protocol.jsonl import read_jsonl
from protocol.rundir import RunPaths, read_events, read_manifest, write_manifest
from protocol.steplog import StepLogTailer, read_steplog
from trainerd.verify import harness
from trainerd.verify import m1 as verify_m1

SEED = verify_m1.SEED
STEPS = verify_m1.VERIFY_STEPS
EVERY = verify_m1.VERIFY_CHECKPOINT_EVERY
REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 150

_MAIN = harness.CLI_MAIN

# -- bootstraps: test-only monkeypatches applied in the child before the CLI starts ---------------

# The negative control: a resume that restores everything BUT the RNG states.
SKIP_RNG_RESTORE = textwrap.dedent("""
    import trainerd.run.trainer as _ppo
    _ppo.restore_rng_state = lambda rng, state: None
""")


def kill_during_step(step: int) -> str:
    """SIGKILL itself in the middle of PPO step `step` (at its first value-head update,
    after the policy has already been updated once in memory)."""
    return textwrap.dedent(f"""
        import os, signal
        import trainerd.run.trainer as _ppo
        _orig = _ppo.Trainer.ppo_step
        def _ppo_step(self, step):
            if step == {step}:
                def _die(*a, **k):
                    os.kill(os.getpid(), signal.SIGKILL)
                self.c.value_opt.step = _die
            return _orig(self, step)
        _ppo.Trainer.ppo_step = _ppo_step
    """)


def kill_mid_state_write(step: int) -> str:
    """SIGKILL itself halfway through writing state.pt of the checkpoint of `step`
    (a torn file in the checkpoint's temp dir)."""
    return textwrap.dedent(f"""
        import builtins, os, signal
        import trainerd.run.checkpoint as _ck
        class _Torn:
            def __init__(self, f): self.f = f
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush(); os.fsync(self.f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            def __enter__(self): return self
            def __exit__(self, *a): return self.f.__exit__(*a)
            def __getattr__(self, name): return getattr(self.f, name)
        def _open(path, mode="r", *a, **k):
            f = builtins.open(path, mode, *a, **k)
            p = str(path)
            if ".tmp-step_{step:06d}" in p and p.endswith(_ck.STATE_FILE) and "w" in mode:
                return _Torn(f)
            return f
        _ck.open = _open
    """)


def kill_before_checkpoint_rename(step: int) -> str:
    """SIGKILL itself after the checkpoint of `step` is fully written and fsynced in its
    temp dir, just before the rename that publishes it."""
    return textwrap.dedent(f"""
        import os, signal
        import trainerd.run.checkpoint as _ck
        _orig = _ck._fsync_dir
        def _fsync_dir(path):
            _orig(path)
            if os.path.basename(str(path)).startswith(".tmp-step_{step:06d}"):
                os.kill(os.getpid(), signal.SIGKILL)
        _ck._fsync_dir = _fsync_dir
    """)


# -- running trainerd ------------------------------------------------------------------------------


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("SEED", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
_EXITING = threading.Event()


def trainerd(
    *args: str, bootstrap: str = "", env: dict | None = None, timeout: float = RUN_TIMEOUT, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run `trainerd ARGS` in a fresh interpreter, optionally after a test bootstrap."""
    code = bootstrap + "\n" + _MAIN if bootstrap else _MAIN
    cmd = [sys.executable, "-c", code, *args]
    with _CHILDREN_LOCK:
        if _EXITING.is_set():
            raise RuntimeError("test session is ending")
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or child_env(), cwd=cwd or REPO
        )
        _CHILDREN.add(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


_ROOT: list[Path] = []
_ROOT_LOCK = threading.Lock()


def runs_root() -> Path:
    with _ROOT_LOCK:
        if not _ROOT:
            d = Path(tempfile.mkdtemp(prefix="m1-runs-"))
            if os.environ.get("M1_KEEP_RUNS") != "1":
                atexit.register(shutil.rmtree, d, True)
            _ROOT.append(d)
        return _ROOT[0]


def config_path() -> Path:
    p = runs_root() / "verify_m1.toml"
    if not p.exists():
        harness.write_config_toml(p, verify_m1.VERIFY_CONFIG)
    return p


def start_args(run_id: str, seed: int = SEED) -> list[str]:
    return verify_m1.start_args(runs_root(), run_id, config_path(), seed)


def records(paths: RunPaths) -> list[dict]:
    recs, stats = read_steplog(paths.steps)
    assert stats.corrupt_frames == 0, f"{paths.steps}: {stats}"
    return recs


def resume_checks(paths: RunPaths) -> list[dict]:
    return [e for e in read_events(paths) if e.get("event") == "resume_check"]


# -- shared runs -----------------------------------------------------------------------------------


@dataclass
class Scenario:
    """A run killed somehow, then resumed (possibly through a bootstrap)."""

    name: str
    paths: RunPaths
    kill_rc: int = 0  # exit status of the killed process (-9 for SIGKILL)
    last_step_before_kill: int = 0
    checkpoints_before_kill: list = field(default_factory=list)  # complete ones
    resume: subprocess.CompletedProcess | None = None

    @property
    def records(self) -> list[dict]:
        return records(self.paths)


_POOL = ThreadPoolExecutor(max_workers=2)  # two trainer processes at a time on 2 cores


def _drop_unused_runs() -> None:
    """At interpreter exit (before worker threads are joined): drop the queued runs no test
    asked for, and stop the ones in flight, so a partial test selection ends at once."""
    _POOL.shutdown(wait=False, cancel_futures=True)
    with _CHILDREN_LOCK:
        _EXITING.set()
        children = list(_CHILDREN)
    for p in children:
        p.kill()
    harness.kill_all()  # also refuses any new harness trainer


threading._register_atexit(_drop_unused_runs)  # runs before the pool's workers are joined
_FUTURES: dict[str, Future] = {}
_FLOCK = threading.Lock()


def _once(key: str, fn) -> Future:
    with _FLOCK:
        if key not in _FUTURES:
            _FUTURES[key] = _POOL.submit(fn)
        return _FUTURES[key]


def _reference() -> RunPaths:
    r = trainerd(*start_args("reference"))
    assert r.returncode == 0, r.stderr[-2000:]
    return RunPaths(runs_root() / "reference")


def reference_run() -> RunPaths:
    """An uninterrupted run of the verify config, seed SEED."""
    queue_all()
    return _FUTURES["reference"].result()


def _complete_checkpoints(paths: RunPaths) -> list[int]:
    return verify_m1.checkpoint_steps(paths)


def _kill_then_resume(
    name: str, kill_bootstrap: str | None, kill_at_step: int | None, resume_bootstrap: str = ""
) -> Scenario:
    paths = RunPaths(runs_root() / name)
    if kill_bootstrap is not None:  # the trainer kills itself at a chosen point
        r = trainerd(*start_args(name), bootstrap=kill_bootstrap)
        kill_rc = r.returncode
    else:  # killed from outside, as soon as the log reaches kill_at_step
        _, _ = verify_m1.run_killed_at(runs_root(), name, config_path(), SEED, kill_at_step, env=child_env())
        kill_rc = -9
    recs, _ = read_steplog(paths.steps)
    sc = Scenario(name, paths, kill_rc, max((x["step"] for x in recs), default=0), _complete_checkpoints(paths))
    sc.resume = trainerd("resume", str(paths.root), "--foreground", bootstrap=resume_bootstrap)
    return sc


def _kill_during_resume() -> Scenario:
    """Killed at step 8 (checkpoint 5); the resume is killed in turn inside step 7 (after it
    recomputed 6); the second resume must still end bitwise equal and compare 6..8."""
    name = "kill_during_resume"
    paths = RunPaths(runs_root() / name)
    verify_m1.run_killed_at(runs_root(), name, config_path(), SEED, EVERY + 3, env=child_env())
    recs, _ = read_steplog(paths.steps)
    sc = Scenario(name, paths, -9, max(r["step"] for r in recs), _complete_checkpoints(paths))
    first = trainerd("resume", str(paths.root), "--foreground", bootstrap=kill_during_step(EVERY + 2))
    assert first.returncode == -9, first.stderr[-2000:]
    sc.resume = trainerd("resume", str(paths.root), "--foreground")
    return sc


SCENARIOS = {
    "kill_during_resume": _kill_during_resume,
    # killed in the middle of step 8 (after checkpoint 5): recompute 6..7 (8 was never logged)
    "kill_during_step": lambda: _kill_then_resume("kill_during_step", kill_during_step(8), None),
    # state.pt of checkpoint 10 torn: 10 is not a checkpoint, resume from 5
    "kill_mid_checkpoint_write": lambda: _kill_then_resume(
        "kill_mid_checkpoint_write", kill_mid_state_write(2 * EVERY), None
    ),
    # checkpoint 10 fully written but not renamed into place: still resume from 5
    "kill_before_checkpoint_rename": lambda: _kill_then_resume(
        "kill_before_checkpoint_rename", kill_before_checkpoint_rename(2 * EVERY), None
    ),
    # SIGKILL from outside at a step after checkpoint 10, as `verify m1` does
    "kill_from_outside": lambda: _kill_then_resume("kill_from_outside", None, 2 * EVERY + 2),
    # the negative control: killed like above, resumed WITHOUT restoring the RNG states
    "resume_without_rng_restore": lambda: _kill_then_resume(
        "resume_without_rng_restore", None, EVERY + 3, resume_bootstrap=SKIP_RNG_RESTORE
    ),
}


def _killed_unresumed() -> RunPaths:
    name = "killed_unresumed"
    verify_m1.run_killed_at(runs_root(), name, config_path(), SEED, 2 * EVERY + 2, env=child_env())
    return RunPaths(runs_root() / name)


def killed_run_copy(new_name: str) -> RunPaths:
    """A private copy of a run SIGKILLed at step 12 (checkpoint 10) and not resumed yet."""
    queue_all()
    return copy_run(_FUTURES["killed_unresumed"].result(), new_name)


def resume_until_resume_check(
    paths: RunPaths, *extra_args: str, env: dict | None = None, timeout: float = RUN_TIMEOUT
) -> dict:
    """`trainerd resume RUN --foreground EXTRA`, SIGKILLed as soon as its resume_check event
    is written (the steps after it are not needed by the caller); returns that event."""
    import time

    log = paths.root.parent / f"{paths.run_id}.resume.out"
    p = harness.Trainer(["resume", str(paths.root), "--foreground", *extra_args], log, env or child_env()).start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            found = resume_checks(paths)
            if found:
                return found[-1]
            if p.poll() is not None:
                found = resume_checks(paths)
                assert found, f"resume exited {p.proc.returncode} without a resume_check: {p.tail(5)}"
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no resume_check event within {timeout} s: {p.tail(5)}")
    finally:
        p.kill()


def queue_all() -> None:
    """Queue every shared run at the first request, so the pool keeps two trainers busy
    while the tests that need a single process run beside it."""
    _once("killed_unresumed", _killed_unresumed)
    _once("reference", _reference)
    for key, fn in SCENARIOS.items():
        _once(key, fn)


def scenario(name: str) -> Scenario:
    queue_all()
    return _FUTURES[name].result()


def edit_manifest(paths: RunPaths, **changes) -> dict:
    m = read_manifest(paths)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(m.get(k), dict):
            m[k] = {**m[k], **v}
        else:
            m[k] = v
    write_manifest(paths, m)
    return m


def copy_run(paths: RunPaths, new_name: str) -> RunPaths:
    dst = runs_root() / new_name
    shutil.copytree(paths.root, dst, ignore=shutil.ignore_patterns("trainerd.lock", "trainerd.pid"))
    return RunPaths(dst)


__all__ = [
    "SEED",
    "STEPS",
    "EVERY",
    "trainerd",
    "child_env",
    "reference_run",
    "scenario",
    "records",
    "resume_checks",
    "edit_manifest",
    "copy_run",
    "killed_run_copy",
    "resume_until_resume_check",
    "read_jsonl",
    "StepLogTailer",
    "runs_root",
    "config_path",
    "start_args",
]
