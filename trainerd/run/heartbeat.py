"""The writer's heartbeat: the `heartbeat` file of the run dir, rewritten every few seconds.

A monitor on another host (ssh://, NFS) cannot probe the run's lock; it judges a 'running' run
by its files' newest mtime on the writer host's clock (protocol.rundir.heartbeat_status).
During a long stage (warm start, reward model, a checkpoint, a slow first step) no other file
changes for minutes: the heartbeat says the writer is still there.

One daemon thread, started once the writer holds the run's lock and stopped when the run has
ended (its final status is in run.json by then, and that decides). It never raises into
training nor makes it wait: a failed write is logged once and the next beat tries again. It
uses no random generator (the run stays bitwise reproducible).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

from protocol.rundir import HEARTBEAT_INTERVAL_S, RunPaths, write_json_atomic
from protocol.text import safe_text

# Tests beat faster (the monitor's timeout stays HEARTBEAT_TIMEOUT_S whatever this is).
INTERVAL_ENV = "TRAINERD_HEARTBEAT_INTERVAL_S"
STOP_WAIT_S = 2.0  # how long the end of a run waits for a beat being written


def heartbeat_interval() -> float:
    """HEARTBEAT_INTERVAL_S, or TRAINERD_HEARTBEAT_INTERVAL_S if that is a positive number."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return HEARTBEAT_INTERVAL_S
    return value if 0 < value < float("inf") else HEARTBEAT_INTERVAL_S


class Heartbeat:
    """Rewrites `paths.heartbeat` every `interval` seconds from `start()` to `stop()`.

    The file is one JSON line: the writer host's `time`, the `pid` and `host` of the process
    writing the run, its `phase` ("setup", "warm start", "reward model", "ppo") and its
    `last_step` (the last step done, once there is one), and `interval_s`."""

    def __init__(self, paths: RunPaths, log: Callable[[str], None], interval: float | None = None):
        self.paths = paths
        self.log = log
        self.interval = interval if interval is not None else heartbeat_interval()
        self.phase = "setup"
        self.last_step: int | None = None
        self._host = socket.gethostname()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False  # a write failed already (said once in the log)

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._beat_until_stopped, name="trainerd-heartbeat", daemon=True)
        self._thread.start()
        return self

    def note(self, phase: str | None = None, last_step: int | None = None) -> None:
        """What the next beat says (two attribute stores: cheap enough for every step)."""
        if phase is not None:
            self.phase = phase
        if last_step is not None:
            self.last_step = last_step

    def stop(self) -> None:
        """No beat after this returns (unless one stuck on the disk outlives STOP_WAIT_S)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            self._thread = None

    def _beat_until_stopped(self) -> None:
        while not self._stopped.is_set():
            self._beat()
            self._stopped.wait(self.interval)

    def _beat(self) -> None:
        beat: dict = {
            "time": time.time(),
            "pid": os.getpid(),
            "host": self._host,
            "phase": self.phase,
            "interval_s": self.interval,
        }
        if self.last_step is not None:
            beat["last_step"] = self.last_step
        try:
            # no fsync: the file only has to be seen by readers, and a beat lost to a power cut is harmless
            write_json_atomic(self.paths.heartbeat, beat, root=self.paths.root, fsync=False)
        except Exception as e:  # a full disk, a planted link: training goes on
            if not self._failed:
                self._failed = True
                self.log(
                    f"cannot write the heartbeat {safe_text(self.paths.heartbeat)}: {safe_text(str(e), 200)} "
                    "(training goes on; a monitor on another host judges the run by its other files)"
                )
