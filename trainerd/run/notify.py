"""Notifications: run a user command (`--notify CMD`, config key `notify`) when a run needs
its owner: a critical alert (fired or escalated), a crash, a stall, and the end of the run.

The command runs through the shell (`sh -c CMD`) with the event as one JSON object on its
standard input and `RLHF_KIT_EVENT` (the kind), `RLHF_KIT_RUN` (the run dir) and
`RLHF_KIT_SUMMARY` (one line) in its environment, so `curl`, `mail` or `ntfy` can be hooked
without the kit knowing any service. Each command runs on a background thread, in its own
session, with a timeout (then its process group is killed); nothing it does (a non-zero exit,
a timeout, a command not found) affects training: a failure is logged once per cause to the
run's log and as a `notify_failed` event. A flood is rate-limited: at most one notification per
kind (an alert's rule, stall) per `per_kind_s`, and at most `cap` in any `cap_window_s`; the
end and crash notifications always go out.

A stall is no step completed for max(`stall_min_s`, `stall_factor` x the median step time),
watched by a small thread once the first step has completed (setup is not watched); it fires
once per stall.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from protocol.rundir import RunPaths, append_event

TIMEOUT_S = 30.0  # a command still running after this is killed (its whole process group)
CLOSE_GRACE_S = 10.0  # at the end of the run, in-flight commands get this long, then are killed
PER_KIND_S = 60.0
CAP = 10
CAP_WINDOW_S = 600.0
STALL_MIN_S = 60.0
STALL_FACTOR = 20.0
END_KINDS = ("finished", "stopped", "failed", "crashed")


class RateLimiter:
    """At most one notification per key per `per_kind_s`, at most `cap` in any `window_s`
    (`always` ones, the end and crash, go out regardless and are not counted against the cap)."""

    def __init__(self, per_kind_s=PER_KIND_S, cap=CAP, window_s=CAP_WINDOW_S, clock=time.monotonic):
        self.per_kind_s, self.cap, self.window_s, self.clock = per_kind_s, cap, window_s, clock
        self._last: dict[str, float] = {}
        self._sent: deque[float] = deque()
        self.suppressed = 0

    def allow(self, key: str, always: bool = False) -> bool:
        now = self.clock()
        if always:
            return True
        while self._sent and now - self._sent[0] >= self.window_s:
            self._sent.popleft()
        last = self._last.get(key)
        if (last is not None and now - last < self.per_kind_s) or len(self._sent) >= self.cap:
            self.suppressed += 1
            return False
        self._last[key] = now
        self._sent.append(now)
        return True


class Notifier:
    """`cmd` None or empty: every method is a no-op (no thread is started)."""

    def __init__(
        self,
        cmd: str | None,
        paths: RunPaths,
        log: Callable[[str], None],
        *,
        timeout_s: float = TIMEOUT_S,
        close_grace_s: float = CLOSE_GRACE_S,
        limiter: RateLimiter | None = None,
        stall_min_s: float = STALL_MIN_S,
        stall_factor: float = STALL_FACTOR,
        poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cmd = cmd or None
        self.paths, self.log, self.timeout_s, self.close_grace_s = paths, log, timeout_s, close_grace_s
        self.limiter = limiter or RateLimiter(clock=clock)
        self.stall_min_s, self.stall_factor, self.clock = stall_min_s, stall_factor, clock
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._procs: set[subprocess.Popen] = set()
        self._failed_causes: set[str] = set()
        self._step_times: deque[float] = deque(maxlen=50)
        self._last_step: int | None = None
        self._last_step_at: float | None = None
        self._stalled = False
        self._ended = False
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if self.cmd:
            self._poll_s = poll_s if poll_s is not None else min(5.0, max(0.01, stall_min_s / 10))
            self._watchdog = threading.Thread(target=self._watch, name="notify-watchdog", daemon=True)
            self._watchdog.start()

    # -- what the trainer reports --------------------------------------------------------------
    def alert(self, event: str, alert) -> None:
        """An alert event (`alert`, `alert_escalated`, `alert_cleared`): notifies a critical
        one fired or escalated."""
        if not self.cmd or event not in ("alert", "alert_escalated") or alert.severity != "critical":
            return
        summary = f"{event} at step {alert.step}: {alert.message()}"
        self._send(event, alert.to_event(event), summary, key=f"alert:{alert.rule}")

    def step_done(self, step: int, step_time: float) -> None:
        if not self.cmd:
            return
        with self._lock:
            self._last_step, self._last_step_at = step, self.clock()
            if step_time == step_time and step_time >= 0:  # not NaN
                self._step_times.append(float(step_time))
            self._stalled = False

    def ended(self, status: str, step: int, reason: str | None = None) -> None:
        if not self.cmd:
            return
        self._ended = True
        fields: dict[str, Any] = {"step": step, "status": status}
        if reason:
            fields["reason"] = reason
        self._send(status, fields, f"run {status} at step {step}" + (f": {reason}" if reason else ""), always=True)

    def crashed(self, error: str) -> None:
        if not self.cmd or self._ended:
            return
        self._ended = True
        step = self._last_step
        self._send("crashed", {"error": error, "step": step}, f"run crashed: {error}", always=True)

    def close(self) -> None:
        """Stop the watchdog; give in-flight commands `close_grace_s` (each at most its own
        timeout), then kill what is left."""
        if not self.cmd:
            return
        self._stop.set()
        deadline = time.monotonic() + self.close_grace_s
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self._procs)
        for p in left:
            _kill_group(p)
        for t in list(self._threads):
            t.join(2.0)

    # -- the stall watchdog ----------------------------------------------------------------------
    def stall_threshold(self) -> float:
        with self._lock:
            med = statistics.median(self._step_times) if self._step_times else 0.0
        return max(self.stall_min_s, self.stall_factor * med)

    def check_stall(self) -> bool:
        """Notify a stall if no step completed for the threshold (once per stall). True if one
        was sent now."""
        if self._ended:
            return False
        with self._lock:
            at, step, stalled = self._last_step_at, self._last_step, self._stalled
        if at is None or stalled:
            return False
        threshold = self.stall_threshold()
        idle = self.clock() - at
        if idle < threshold:
            return False
        with self._lock:
            self._stalled = True
        fields = {"step": step, "idle_s": round(idle, 3), "threshold_s": round(threshold, 3)}
        self._send("stall", fields, f"no step completed for {idle:.0f}s (last step {step})", key="stall")
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.check_stall()
            except Exception as e:  # the watchdog never takes training down
                self.log(f"notify: stall watchdog error: {e}")

    # -- running the command -----------------------------------------------------------------
    def _send(self, kind: str, fields: dict, summary: str, key: str | None = None, always: bool = False) -> None:
        if not self.limiter.allow(key or kind, always=always):
            return
        payload = {
            "event": kind,
            "run": str(self.paths.root),
            "run_id": self.paths.root.name,
            "time": time.time(),
            "summary": _one_line(f"run {self.paths.root.name}: {summary}"),
            "suppressed": self.limiter.suppressed,
            **fields,
        }
        t = threading.Thread(target=self._run, args=(kind, payload), name=f"notify-{kind}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _run(self, kind: str, payload: dict) -> None:
        env = dict(
            os.environ,
            RLHF_KIT_EVENT=kind,
            RLHF_KIT_RUN=payload["run"],
            RLHF_KIT_SUMMARY=payload["summary"],
        )
        data = (json.dumps(_finite(payload), default=str) + "\n").encode()
        try:
            p = subprocess.Popen(
                ["sh", "-c", self.cmd],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group: killed as a whole on timeout
                close_fds=True,
            )
        except OSError as e:
            self._failed("not_found", kind, f"cannot run sh: {e}")
            return
        with self._lock:
            self._procs.add(p)
        try:
            try:
                _, err = p.communicate(data, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(p)
                p.communicate()
                self._failed("timeout", kind, f"still running after {self.timeout_s:g}s: killed")
                return
            if p.returncode != 0:
                last = _one_line((err or b"").decode("utf-8", "replace").strip().splitlines()[-1:] or [""])
                if p.returncode == 127:
                    cause = "not_found"
                elif p.returncode < 0 and self._stop.is_set():  # killed by close()
                    cause, last = "timeout", f"still running {self.close_grace_s:g}s after the run ended: killed"
                else:
                    cause = "exit"
                self._failed(cause, kind, f"exit status {p.returncode}" + (f": {last}" if last else ""))
        except Exception as e:  # a notification never takes training down
            self._failed("error", kind, f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._procs.discard(p)

    def _failed(self, cause: str, kind: str, detail: str) -> None:
        """Logged once per cause (not once per call)."""
        with self._lock:
            if cause in self._failed_causes:
                return
            self._failed_causes.add(cause)
        detail = _one_line(detail)
        try:
            self.log(f"notify command failed ({cause}) for {kind}: {detail} (further {cause} failures not logged)")
        except Exception:
            pass
        try:
            append_event(self.paths, "notify_failed", cause=cause, kind=kind, detail=detail)
        except Exception:
            pass


def _finite(v):
    """Strict JSON for a webhook: a NaN or infinite value becomes its name as a string."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _one_line(text, limit: int = 300) -> str:
    if isinstance(text, list):
        text = text[0] if text else ""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."
