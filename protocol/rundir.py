"""The run directory: layout, manifest (`run.json`), `latest` link, writer lock, events.

    runs/
      latest -> <run_id>
      <run_id>/run.json steps.msgpack steps.jsonl events.jsonl tb/ profile/ checkpoints/
               trainerd.pid trainerd.log trainerd.lock

One process writes a run directory at a time (an flock on `trainerd.lock`); readers
never take the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from . import jsonl
from .catalogue import SCHEMA_VERSION

STATUSES = ("running", "finished", "stopped", "crashed", "failed")


class RunDirError(Exception):
    """A problem with a run directory a user can fix; its message is one line."""


class RunLockedError(RunDirError):
    pass


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def steps(self) -> Path:
        return self.root / "steps.msgpack"

    @property
    def steps_jsonl(self) -> Path:
        return self.root / "steps.jsonl"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def pid_file(self) -> Path:
        return self.root / "trainerd.pid"

    @property
    def log(self) -> Path:
        return self.root / "trainerd.log"

    @property
    def lock_file(self) -> Path:
        return self.root / "trainerd.lock"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"


def new_run_id(prefix: str = "run") -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{prefix}"


def create_run(runs_dir: str | os.PathLike, run_id: str | None = None, prefix: str = "run") -> RunPaths:
    """Make a new, empty run directory; refuse an existing one."""
    runs = Path(runs_dir)
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create runs dir {runs}: {e.strerror}") from None
    rid = run_id or new_run_id(prefix)
    if not rid or "/" in rid or rid in (".", "..", "latest"):
        raise RunDirError(f"invalid run id {rid!r}")
    root = runs / rid
    n = 1
    while run_id is None and root.exists():  # two runs started in the same second
        n += 1
        root = runs / f"{rid}-{n}"
    try:
        root.mkdir()
    except FileExistsError:
        raise RunDirError(f"run {root} already exists (use `trainerd resume {root}` or another --run-id)") from None
    except OSError as e:
        raise RunDirError(f"cannot create run dir {root}: {e.strerror}") from None
    paths = RunPaths(root)
    for d in (paths.tb, paths.profile, paths.checkpoints):
        d.mkdir()
    return paths


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(jsonl.dumps(data))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_manifest(paths: RunPaths, config: dict, seed: int, determinism: dict, versions: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": paths.run_id,
        "config": config,
        "seed": seed,
        "determinism": determinism,
        "versions": versions,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "status": "running",
        "started_at": time.time(),
        "ended_at": None,
        "last_step": 0,
        "last_checkpoint": None,
    }


def write_manifest(paths: RunPaths, manifest: dict) -> None:
    write_json_atomic(paths.manifest, manifest)


def read_manifest(run_dir: str | os.PathLike | RunPaths) -> dict:
    paths = run_dir if isinstance(run_dir, RunPaths) else RunPaths(Path(run_dir))
    try:
        text = paths.manifest.read_text()
    except FileNotFoundError:
        raise RunDirError(f"{paths.root} is not a run directory (no run.json)") from None
    except OSError as e:
        raise RunDirError(f"cannot read {paths.manifest}: {e.strerror}") from None
    try:
        data = jsonl.loads(text)
    except ValueError:
        raise RunDirError(f"{paths.manifest} is corrupt (not valid JSON)") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{paths.manifest} is corrupt (not a JSON object)")
    return data


def update_manifest(paths: RunPaths, **changes) -> dict:
    m = read_manifest(paths)
    m.update(changes)
    write_manifest(paths, m)
    return m


def switch_latest(runs_dir: str | os.PathLike, run_id: str) -> None:
    """Point `runs/latest` at `run_id` atomically (a new link renamed over the old)."""
    runs = Path(runs_dir)
    tmp = runs / f".latest.{os.getpid()}.tmp"
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(run_id, tmp)
    os.replace(tmp, runs / "latest")


class RunLock:
    """The writer's lock on a run directory (flock, released by the kernel if the process dies)."""

    def __init__(self, paths: RunPaths):
        self.paths = paths
        self._fd = -1

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.paths.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot lock run {self.paths.root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode().strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f" by pid {holder}" if holder else ""
                raise RunLockedError(f"run {self.paths.root} is locked{who}: another trainerd is writing it") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def is_locked(paths: RunPaths) -> bool:
    """Whether a writer holds the run (tested with a shared, non-blocking flock that is
    released at once; it never blocks a writer)."""
    try:
        fd = os.open(paths.lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(manifest: dict, paths: RunPaths | None = None) -> str:
    """The manifest's status, except that a 'running' run whose writer is gone is 'crashed'.

    With `paths`, a run whose lock file exists is judged by the lock (robust to a daemon
    that forked after writing its pid, and to pid reuse); otherwise by the manifest's pid.
    """
    status = manifest.get("status", "unknown")
    if status == "running" and paths is not None and paths.lock_file.exists():
        return "running" if is_locked(paths) else "crashed"
    if status == "running" and manifest.get("host") == socket.gethostname():
        if not pid_alive(manifest.get("pid")):
            return "crashed"
    return status


def resolve_run(path: str | os.PathLike) -> RunPaths:
    """A run dir, or a runs dir (its `latest`, else its newest run) -> the run's paths."""
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"no such run or runs dir: {p}")
    if not p.is_dir():
        raise RunDirError(f"not a directory: {p}")
    if (p / "run.json").exists():
        return RunPaths(p)
    latest = p / "latest"
    if latest.exists() and (latest / "run.json").exists():
        return RunPaths(latest)
    runs = find_runs(p)
    if runs:
        return runs[-1].paths
    raise RunDirError(f"{p} holds no runs (no run.json, no latest)")


@dataclass
class RunInfo:
    paths: RunPaths
    manifest: dict
    status: str

    @property
    def run_id(self) -> str:
        return self.paths.run_id


def find_runs(runs_dir: str | os.PathLike) -> list[RunInfo]:
    """Runs in a runs dir, oldest first (by start time); unreadable ones are passed over."""
    out: list[RunInfo] = []
    try:
        entries = list(Path(runs_dir).iterdir())
    except OSError:
        return out
    for d in entries:
        if d.name == "latest" or d.name.startswith(".") or not d.is_dir():
            continue
        try:
            m = read_manifest(d)
        except RunDirError:
            continue
        paths = RunPaths(d)
        out.append(RunInfo(paths, m, effective_status(m, paths)))
    out.sort(key=lambda r: (r.manifest.get("started_at") or 0, r.run_id))
    return out


def append_event(paths: RunPaths, event: str, **fields) -> dict:
    """Append one lifecycle or alert event to events.jsonl (one write, one line)."""
    rec = {"event": event, "time": time.time(), **fields}
    with jsonl.JsonlWriter(paths.events) as w:
        w.write(rec)
    return rec


def read_events(paths: RunPaths) -> list[dict]:
    return jsonl.read_jsonl(paths.events)
