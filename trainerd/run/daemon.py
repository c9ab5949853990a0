"""Detaching a trainer from the terminal, and talking to a running one.

`spawn_detached(log_path, body)` double-forks: the grandchild is in its own session (no
controlling terminal, so closing the SSH session does not kill it), its stdin is /dev/null
and its stdout/stderr go to trainerd.log. It calls `body(ready)`; `ready()` tells the
waiting parent that the run is set up (lock held, manifest written), so `trainerd start`
returns at once but never before the run is visible to `status`. An error before `ready()`
comes back to the parent as one line.

SIGTERM asks the trainer to finish the current step, checkpoint and exit (`stop`).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from protocol.rundir import RunPaths, effective_status, lock_holder, pid_alive, read_manifest

READY = b"ok\n"


class DaemonError(Exception):
    """The daemon could not be started or reached; the message is one line."""


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def spawn_detached(log_path: Path, body: Callable[[Callable[[], None]], int], timeout: float = 120.0) -> int:
    """Run `body(ready)` in a detached grandchild; returns its pid once it called ready()."""
    r, w = os.pipe()
    pid_r, pid_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # first child: new session, fork again, exit (the grandchild is orphaned to init)
        try:
            os.close(r)
            os.close(pid_r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _run_grandchild(log_path, body, w, pid_w)
        finally:
            os._exit(1)
    os.close(w)
    os.close(pid_w)
    os.waitpid(child, 0)
    grandchild = int(_read_all(pid_r, 10.0).decode() or "0")
    msg = _read_all(r, timeout)
    if msg == READY:
        return grandchild
    if not msg:
        raise DaemonError(f"the trainer exited during start-up without a word; see {log_path}")
    raise DaemonError(msg.decode(errors="replace").strip().removeprefix("error: "))


def _read_all(fd: int, timeout: float) -> bytes:
    """Read until EOF or the first line, at most `timeout` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data


def _run_grandchild(log_path: Path, body, w: int, pid_w: int) -> None:
    os.write(pid_w, str(os.getpid()).encode() + b"\n")
    os.close(pid_w)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    state = {"told": False}

    def ready() -> None:
        if not state["told"]:
            os.write(w, READY)
            os.close(w)
            state["told"] = True

    code = 1
    try:
        code = body(ready)
    except BaseException as e:  # noqa: BLE001 - the parent must hear about any failure
        if not state["told"]:
            os.write(w, f"error: {one_line(e)}\n".encode())
            os.close(w)
            state["told"] = True
        else:
            traceback.print_exc()
        print(f"trainerd: {one_line(e)}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def request_stop(paths: RunPaths, timeout: float = 300.0, poll_s: float = 0.2) -> str:
    """SIGTERM the process that holds the run's writer lock (never a pid from run.json, which
    may since belong to someone else) and wait until it has checkpointed and exited; the
    final status."""
    pid = lock_holder(paths)
    if pid is None:
        status = effective_status(read_manifest(paths), paths)
        raise DaemonError(f"run {paths.root} is not running (status {status})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise DaemonError(f"run {paths.root}: trainer pid {pid} is gone (crashed)") from None
    except PermissionError:
        raise DaemonError(f"run {paths.root}: not allowed to signal trainer pid {pid}") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock_holder(paths) is None:  # the lock is dropped when the trainer exits
            _wait_gone(pid)
            return effective_status(read_manifest(paths), paths)
        time.sleep(poll_s)
    raise DaemonError(f"run {paths.root}: trainer pid {pid} did not stop within {timeout:.0f} s")


def wait_for_end(paths: RunPaths, timeout: float | None = None, poll_s: float = 0.5) -> str:
    """Block until the run is no longer running (its writer lock is free); its final status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid = lock_holder(paths)
        status = effective_status(read_manifest(paths), paths)
        if status != "running":
            if pid is not None:  # the manifest is final before the process exits: let it close files
                _wait_gone(pid)
            return effective_status(read_manifest(paths), paths)
        if deadline is not None and time.monotonic() > deadline:
            raise DaemonError(f"run {paths.root} still running after {timeout:.0f} s")
        time.sleep(poll_s)


def _wait_gone(pid: int, limit_s: float = 5.0) -> None:
    end = time.monotonic() + limit_s
    while pid_alive(pid) and pid != os.getpid() and time.monotonic() < end:
        time.sleep(0.05)


def install_stop_signals() -> Callable[[], bool]:
    """SIGTERM (and SIGINT) ask for a graceful stop at the end of the current step.
    Installed before the trainer reports ready, so an early `stop` is never lost."""
    requested = {"flag": False}

    def handler(signum, frame):
        requested["flag"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return lambda: requested["flag"]
