"""The one harness under `trainerd verify m1|m2|m3|all [RUN] [--json]`.

Each check (m1.py, m2.py, m3.py) is a `body(h: Harness)` that adds named results to
`h.checks` and is run by `run_check`, which owns everything the three share:

* ONE result type, `CheckList`: named checks, each passed (`passed: true`), failed
  (`false`) or could not finish (`passed: null`, detail "could not finish: <why>", printed
  as "n/a", never as FAIL).
* ONE way to launch a trainer, `Trainer`: `trainerd ... --foreground` run by this
  interpreter (`python -c CLI_MAIN`), one thread, SEED removed from the env, in its OWN
  process group (`start_new_session=True`), output to a log file, registered while it lives.
  `run_parallel` runs jobs two at a time (2 cores).
* ONE temp-dir policy: `Harness.tempdir()` makes `trainerd-verify-<check>-*` under
  tempfile.gettempdir(); every one is removed when the check ends, whatever the end
  (TRAINERD_VERIFY_KEEP=1 keeps them after a pass or fail for a post-mortem; never after a
  cancel).
* ONE SIGTERM/SIGINT handler: it raises `Cancelled` in the main thread; the harness then
  refuses new trainers, SIGKILLs the process group of every live trainer (so nothing of the
  tree survives), removes the temp dirs and still prints the JSON object. A signal that
  lands while the main thread is starting a trainer is deferred until the trainer is
  registered. (SIGKILL of verify itself cannot be handled: the monitor sends SIGTERM.)
* ONE JSON shape (stdout, with --json, exactly one line):
  {"check": "m1", "status": "passed"|"failed"|"could_not_run"|"cancelled", "passed": bool,
   "checks": [{"name", "passed": true|false|null, "detail", ...}], "reason": str|null,
   "run": str|null, "duration_s": float}
* ONE exit-code policy: 0 passed; 1 a check failed; 2 could not run (bad RUN, unreadable run
  dir, timeout, a trainer that failed to start or finish, an internal error, or checks that
  could not finish with none failed): the reason is the LAST line on stderr,
  "trainerd verify mX: <reason>"; 130 cancelled (SIGTERM or SIGINT).
* Output: each result line as it lands goes to stdout (stderr under --json, where stdout is
  kept for the JSON object); timestamped progress always goes to stderr.
* ONE value comparator, `same_value` (bitwise on the float bits, via
  trainerd.run.resume_check.value_bits), ONE step-sequence check, `check_step_log` (on
  resume_check.check_step_sequence), ONE TOML writer, `write_config_toml`.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from protocol.rundir import RunDirError
from protocol.text import safe_text
from trainerd.run.resume_check import check_step_sequence, value_bits

PASSED, FAILED, COULD_NOT_RUN, CANCELLED = "passed", "failed", "could_not_run", "cancelled"
EXIT_CODES = {PASSED: 0, FAILED: 1, COULD_NOT_RUN: 2, CANCELLED: 130}
TEMP_PREFIX = "trainerd-verify-"
PARALLEL = 2  # trainer processes at a time, one thread each (2 cores)
MAX_PROBLEM_LINES = 10  # a run with 10k bad steps should not print 10k lines
# The CLI's entry point, run by the same interpreter as this process (so the trainers use
# this torch and this kit, whether or not the `trainerd` script is on PATH).
CLI_MAIN = "from trainerd.cli import main; main()"


class CouldNotRun(Exception):
    """The check as a whole cannot go on (bad RUN, a trainer that cannot start ...): exit 2."""


class CouldNotFinish(Exception):
    """One job of a check could not finish (timeout, trainer exit): that check is 'could not finish'."""


class Cancelled(BaseException):
    """SIGTERM / SIGINT: end the check now (a BaseException so no `except Exception` eats it)."""


# -- results -------------------------------------------------------------------------------------


class CheckList:
    """Named checks in the order they ran; `say(line)` prints each one as it lands."""

    def __init__(self, check: str = "", say: Callable[[str], None] | None = None):
        self.check = check
        self.say = say or (lambda line: print(safe_text(line), file=sys.stderr, flush=True))
        self.items: list[dict] = []

    def add(self, name: str, passed: bool, detail: str, **extra) -> bool:
        item = {"name": name, "passed": bool(passed), "detail": detail, **extra}
        self.items.append(item)
        self._say(item)
        return bool(passed)

    def could_not_finish(self, name: str, why: str, **extra) -> None:
        """A check that could not be carried out to the end: neither passed nor failed."""
        item = {"name": name, "passed": None, "detail": f"could not finish: {why}", **extra}
        self.items.append(item)
        self._say(item)

    def _say(self, item: dict) -> None:
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[item["passed"]]
        self.say(f"{mark} {item['name']}: {item['detail']}")
        problems = item.get("problems") or []
        for p in problems[:MAX_PROBLEM_LINES]:
            self.say(f"       {p}")
        if len(problems) > MAX_PROBLEM_LINES:
            self.say(f"       ... and {len(problems) - MAX_PROBLEM_LINES} more")

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.items if c["passed"] is False]

    @property
    def unfinished(self) -> list[dict]:
        return [c for c in self.items if c["passed"] is None]

    @property
    def passed(self) -> bool:
        """True only if there was at least one check and every one passed."""
        return bool(self.items) and all(c["passed"] is True for c in self.items)

    @property
    def status(self) -> str:
        if self.failed:
            return FAILED
        return PASSED if self.passed else COULD_NOT_RUN


# -- values, step logs, configs ---------------------------------------------------------------------


def _canonical_nan(v):
    if isinstance(v, float) and math.isnan(v):
        return math.nan
    if isinstance(v, dict):
        return {k: _canonical_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canonical_nan(x) for x in v]
    return v


def same_value(a, b, *, any_nan: bool = False) -> bool:
    """The one value comparator: same type and, for floats, the same IEEE-754 bits (so
    -0.0 != 0.0, int 1 != float 1.0; maps and lists elementwise).

    `any_nan=True` lets any NaN equal any NaN and nothing else: for a side that went through
    JSON text (steps.jsonl writes every NaN as "NaN", so the payload and sign bits of a NaN
    are lost there and it reads back as the canonical NaN) or through float32 (TensorBoard).
    """
    if any_nan:
        a, b = _canonical_nan(a), _canonical_nan(b)
    return value_bits(a) == value_bits(b)


def step_log_problem(records: list[dict], corrupt_frames: int = 0) -> str | None:
    """The one step-sequence check: None if the log holds steps 1, 2, ... without gap,
    duplicate or corrupt frame; else the first problem in one line."""
    problems = []
    if not records:
        problems.append("no records")
    if corrupt_frames:
        problems.append(f"{corrupt_frames} corrupt frame(s)")
    seq = check_step_sequence(records) if records else None
    if seq:
        problems.append(seq)
    return "; ".join(problems) or None


def check_step_log(checks: CheckList, name: str, records: list[dict], corrupt_frames: int = 0) -> bool:
    problem = step_log_problem(records, corrupt_frames)
    detail = (
        problem or f"{len(records)} records, steps {records[0]['step']}..{records[-1]['step']} without gap or duplicate"
    )
    return checks.add(name, problem is None, detail)


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
    """The one TOML writer: a flat config; None values are left out (every optional key's default)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if v is not None]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


# -- trainer processes --------------------------------------------------------------------------------


class _State:
    """What the signal handler and the cleanup share (one check runs at a time per process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.live: set[Trainer] = set()
        self.cancelled = threading.Event()  # set: no new trainer may start
        self.signalled: int | None = None
        self.defer = False  # the main thread is starting a trainer: raise after it is registered


_STATE = _State()


def trainer_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # one thread each: the trainers go two at a time on 2 cores
    env["MKL_NUM_THREADS"] = "1"
    env.pop("SEED", None)  # the seed comes from the config or --seed, never from the caller's shell
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


class Trainer:
    """One `trainerd ARGS` child (python -c CLI_MAIN, optionally after a test bootstrap) in its
    own process group, output to `log_path`; registered from start until it is reaped."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, bootstrap: str = ""):
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = env if env is not None else trainer_env()
        self.bootstrap = bootstrap
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def cmd(self) -> list[str]:
        code = f"{self.bootstrap}\n{CLI_MAIN}" if self.bootstrap else CLI_MAIN
        return [sys.executable, "-c", code, *self.args]

    def start(self) -> Trainer:
        main = threading.current_thread() is threading.main_thread()
        if main:
            _STATE.defer = True
        try:
            with _STATE.lock:  # an interrupt either sees this child in `live` or stops it starting
                if _STATE.cancelled.is_set():
                    raise CouldNotFinish("cancelled")
                self._log = open(self.log_path, "ab")
                try:
                    self.proc = subprocess.Popen(
                        self.cmd,
                        stdout=self._log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=self.env,
                        start_new_session=True,
                    )
                except OSError as e:
                    self._log.close()
                    raise CouldNotRun(f"cannot start a trainer ({sys.executable}): {e.strerror or e}") from None
                _STATE.live.add(self)
        finally:
            if main:
                _STATE.defer = False
                if _STATE.signalled is not None and not _STATE.cancelled.is_set():
                    raise Cancelled(_STATE.signalled)
        return self

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """The exit code; CouldNotFinish (after killing it) if it runs longer than `timeout`."""
        try:
            return self.proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            raise CouldNotFinish(f"did not finish within {timeout:.0f} s") from None
        finally:
            self._forget()

    def kill(self) -> None:
        """SIGKILL the trainer's whole process group (anything it started dies with it)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self._forget()

    def _forget(self) -> None:
        """Unregister once it is reaped (a wait interrupted by a cancel leaves it registered,
        so the cleanup still kills it)."""
        if self.proc is None or self.proc.poll() is None:
            return
        if self._log is not None:
            self._log.close()
        with _STATE.lock:
            _STATE.live.discard(self)

    def tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        lines = [ln for ln in lines if ln.strip() and "USDT" not in ln]
        return " | ".join(lines[-n:])


def run_trainer(args: list[str], log_path: Path, timeout: float, env: dict | None = None, what: str = "") -> None:
    """Run a trainer to its end; CouldNotFinish saying why unless it exits 0."""
    t = Trainer(args, log_path, env).start()
    what = what or " ".join(args[:1])
    try:
        rc = t.wait(timeout)
    except CouldNotFinish as e:
        raise CouldNotFinish(f"{what} {e}") from None
    if rc != 0:
        raise CouldNotFinish(f"{what} exited {rc}: {t.tail()}")


def run_until_step(
    args: list[str],
    log_path: Path,
    steps_path: Path,
    step: int,
    timeout: float,
    env: dict | None = None,
    what: str = "",
) -> int:
    """Start a trainer and SIGKILL it as soon as its step log holds a record at or after `step`
    (or let it end if it exits 0 first); returns the last step the log holds after the kill."""
    from protocol.steplog import StepLogTailer, read_steplog

    t = Trainer(args, log_path, env).start()
    what = what or " ".join(args[:1])
    tailer = StepLogTailer(steps_path)
    last = 0
    deadline = time.monotonic() + timeout
    try:
        while last < step:
            for rec in tailer.poll():
                if isinstance(rec.get("step"), int):
                    last = max(last, rec["step"])
            if last >= step:
                break
            rc = t.poll()
            if rc is not None:
                if rc == 0:
                    break
                raise CouldNotFinish(f"{what} exited {rc} at step {last} before reaching step {step}: {t.tail()}")
            if time.monotonic() > deadline:
                raise CouldNotFinish(f"{what} did not reach step {step} within {timeout:.0f} s (at step {last})")
            time.sleep(0.005)
    finally:
        t.kill()
    records, _ = read_steplog(steps_path)  # the kill may land after more records were written
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return max(steps) if steps else 0


def kill_all() -> None:
    """Refuse new trainers and SIGKILL the process group of every live one."""
    with _STATE.lock:
        _STATE.cancelled.set()
        live = list(_STATE.live)
    for t in live:
        t.kill()


def run_parallel(jobs: list[Callable[[], object]], workers: int = PARALLEL) -> list[tuple[object, Exception | None]]:
    """Run the jobs `workers` at a time; (result, None) or (None, exception) per job, in order.
    On a cancel, no queued job starts and the running trainers are killed before it propagates."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify")
    futures = [pool.submit(j) for j in jobs]
    try:
        out: list[tuple[object, Exception | None]] = []
        for f in futures:
            try:
                out.append((f.result(), None))
            except Exception as e:  # noqa: BLE001 - handed to the caller, which reports it
                out.append((None, e))
    except BaseException:
        kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return out


# -- one check run: signals, temp dirs, output, exit code ---------------------------------------------


class Harness:
    def __init__(self, check: str, as_json: bool):
        self.check = check
        self.as_json = as_json
        self.t0 = time.monotonic()
        self.out = sys.stderr if as_json else sys.stdout
        self.checks = CheckList(check, self.result_line)
        self.run: str | None = None  # the run checked (for the JSON object)
        self.temp_dirs: list[Path] = []

    # Result lines and progress quote run text (a run dir's name, an event's message): escaped.
    def result_line(self, line: str) -> None:
        print(safe_text(line), file=self.out, flush=True)

    def progress(self, msg: str) -> None:
        print(f"[verify {self.check} {self.elapsed():6.1f}s] {safe_text(msg)}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def tempdir(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{self.check}-"))
        self.temp_dirs.append(d)
        return d

    def remove_temp_dirs(self, keep: bool) -> None:
        for d in self.temp_dirs:
            if keep:
                self.progress(f"kept {d} (TRAINERD_VERIFY_KEEP=1)")
            else:
                shutil.rmtree(d, ignore_errors=True)
                if d.exists():  # a file written while it was removed: once more
                    shutil.rmtree(d, ignore_errors=True)
        self.temp_dirs.clear()


def _handler(signum, frame):
    if _STATE.signalled is not None:
        return  # already cancelling: let the cleanup finish
    _STATE.signalled = signum
    if not _STATE.defer:
        raise Cancelled(signum)


def _install_handlers() -> dict | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    return {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}


def run_check(check: str, as_json: bool, body: Callable[[Harness], None], run: str | None = None) -> int:
    """Run `body(h)` under the harness; print the result; return the exit code."""
    h = Harness(check, as_json)
    h.run = run
    with _STATE.lock:
        _STATE.cancelled.clear()
        _STATE.signalled = None
        _STATE.defer = False
    previous = _install_handlers()
    reason: str | None = None
    status: str
    try:
        try:
            body(h)
            status = h.checks.status
        except CouldNotRun as e:
            status, reason = COULD_NOT_RUN, str(e)
        except RunDirError as e:  # a run file refused (a FIFO, a link out of the run): the run's fault
            status, reason = COULD_NOT_RUN, str(e)
        except Cancelled:
            status = CANCELLED
        except Exception as e:  # a bug here must still give one JSON object and exit 2
            status, reason = COULD_NOT_RUN, f"internal error: {type(e).__name__}: {e}"
        finally:
            _STATE.signalled = _STATE.signalled or -1  # from here on a signal is ignored
            kill_all()  # never leave a trainer running behind the check
    finally:
        keep = os.environ.get("TRAINERD_VERIFY_KEEP") == "1" and status != CANCELLED
        h.remove_temp_dirs(keep)
        if status == CANCELLED and _STATE.signalled and _STATE.signalled > 0:
            reason = f"cancelled ({signal.Signals(_STATE.signalled).name})"
        if previous is not None:
            for s, old in previous.items():
                signal.signal(s, old)
        with _STATE.lock:  # trainers started outside a check (tests) may start again
            _STATE.cancelled.clear()
            _STATE.signalled = None
    return _finish(h, status, reason)


def _finish(h: Harness, status: str, reason: str | None) -> int:
    items = h.checks.items
    if status == FAILED:
        reason = f"{len(h.checks.failed)} of {len(items)} checks failed: " + ", ".join(
            c["name"] for c in h.checks.failed
        )
    elif status == COULD_NOT_RUN and reason is None:
        reason = "; ".join(f"{c['name']}: {c['detail']}" for c in h.checks.unfinished) or "no check ran"
    elif status == CANCELLED and reason is None:
        reason = "cancelled"
    duration = h.elapsed()
    if status in (PASSED, FAILED):
        word = "PASSED" if status == PASSED else f"FAILED ({len(h.checks.failed)} of {len(items)} checks)"
        print(f"verify {h.check}: {word} in {duration:.1f} s", file=h.out, flush=True)
    else:  # could not run / cancelled: the reason is the last line on stderr
        print(f"trainerd verify {h.check}: {safe_text(reason, 4000)}", file=sys.stderr, flush=True)
    if h.as_json:
        obj = {
            "check": h.check,
            "status": status,
            "passed": status == PASSED,
            "checks": items,
            "reason": reason,
            "run": h.run,
            "duration_s": round(duration, 3),
        }
        sys.stdout.write(json.dumps(obj, allow_nan=False, default=str) + "\n")
        sys.stdout.flush()
    return EXIT_CODES[status]
