"""The run directory: layout, manifest (`run.json`), `latest` link, writer lock, events.

    runs/
      latest -> <run_id>
      <run_id>/run.json steps.msgpack steps.jsonl events.jsonl tb/ profile/ checkpoints/
               trainerd.pid trainerd.log trainerd.lock heartbeat

One process writes a run directory at a time (an flock on `trainerd.lock`); readers
never take the lock. Whether a run is live is decided by that lock alone
(`effective_status`, `lock_holder`); a copy of a run written on another host is judged by
its writer's heartbeat instead (`heartbeat_status`). Every file here is opened through
`protocol.safeio.open_run_fd` (regular files inside the run dir only, never through a
symlink, never blocking on a FIFO).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import jsonl
from .catalogue import SCHEMA_VERSION, finite_value
from .safeio import (
    RunDirError,
    RunFileError,
    StrPath,
    _kind,
    open_run_fd,
    read_run_file,
    run_dir_fd,
    run_relative,
)
from .text import safe_text

STATUSES = ("running", "finished", "stopped", "crashed", "failed")

# The writer's heartbeat: while a run is written, the trainer rewrites `heartbeat` (one JSON
# line: time, pid, host, phase, last_step) every HEARTBEAT_INTERVAL_S seconds, through long
# stages that write nothing else (warm start, reward model, a checkpoint, a slow step).
HEARTBEAT_FILE = "heartbeat"
HEARTBEAT_INTERVAL_S = 5.0
# A reader on another host calls a 'running' run crashed once its last sign of life is this
# old by the writer host's clock: many missed beats, so a busy or slow disk is not a crash.
HEARTBEAT_TIMEOUT_S = 300.0
# The files whose newest mtime is the writer's last sign of life: the heartbeat, and the files
# a writer changes as it goes (all a run written before the heartbeat existed has).
SIGN_OF_LIFE_FILES = (HEARTBEAT_FILE, "run.json", "steps.msgpack", "events.jsonl", "trainerd.log")


class RunLockedError(RunDirError):
    pass


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __fspath__(self) -> str:
        """A RunPaths is path-like (its root), so it can be passed as `open_run_file`'s root."""
        return os.fspath(self.root)

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
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def alert_rules(self) -> Path:
        return self.root / "alerts.json"

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

    @property
    def heartbeat(self) -> Path:
        return self.root / HEARTBEAT_FILE

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"


def new_run_id(prefix: str = "run") -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{prefix}"


def create_run(runs_dir: StrPath, run_id: str | None = None, prefix: str = "run") -> RunPaths:
    """Make a new, empty run directory; refuse an existing one."""
    runs = Path(runs_dir)
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create runs dir {safe_text(runs)}: {e.strerror}") from None
    rid = run_id or new_run_id(prefix)
    if not rid or "/" in rid or "\0" in rid or rid in (".", "..", "latest") or safe_text(rid) != rid:
        raise RunDirError(f"invalid run id {safe_text(repr(rid))}")
    root = runs / rid
    n = 1
    while run_id is None and root.exists():  # two runs started in the same second
        n += 1
        root = runs / f"{rid}-{n}"
    try:
        root.mkdir()
    except FileExistsError:
        shown = safe_text(root)
        raise RunDirError(f"run {shown} already exists (use `trainerd resume {shown}` or another --run-id)") from None
    except OSError as e:
        raise RunDirError(f"cannot create run dir {safe_text(root)}: {e.strerror}") from None
    paths = RunPaths(root)
    for d in (paths.tb, paths.profile, paths.checkpoints):
        d.mkdir()
    return paths


def write_json_atomic(
    path: StrPath, data: Mapping[str, Any], root: StrPath | None = None, *, fsync: bool = True
) -> None:
    """Replace `path` (inside the run dir `root`, default its parent) by `data` as one JSON line,
    atomically: a new temporary file (created with O_EXCL|O_NOFOLLOW, never through a link)
    is written, fsynced (unless `fsync=False`: a file rewritten every few seconds that a power
    cut may lose) and renamed over it. An existing `path` that is not a regular file (a
    symlink, a FIFO, a directory) is refused, not replaced."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    parts = run_relative(root, path)
    name = parts[-1]
    dir_rel = os.path.join(*parts[:-1]) if len(parts) > 1 else ""
    tmp_name = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp_rel = os.path.join(dir_rel, tmp_name) if dir_rel else tmp_name
    line = (jsonl.dumps(dict(data)) + "\n").encode()
    # the tmp file is made through the safe open, so its directory is checked on the way
    fd = open_run_fd(root, tmp_rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    dfd = run_dir_fd(os.path.join(os.fspath(root), dir_rel) if dir_rel else root)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(line)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(st.st_mode):
                    shown = safe_text(os.path.join(os.fspath(root), *parts))
                    raise RunFileError(f"{shown} is {_kind(st.st_mode)}, not a regular file; refusing to replace it")
            os.replace(tmp_name, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp_name, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)


def new_manifest(
    paths: RunPaths, config: dict[str, Any], seed: int, determinism: dict[str, Any], versions: dict[str, Any]
) -> dict[str, Any]:
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


MAX_MANIFEST_BYTES = 4 << 20  # a run.json over 4 MiB is refused (a real one is a few KiB)
MAX_TIME = 32503680000.0  # 3000-01-01: a time past it is not a real run's

# The documented manifest fields: name -> (check, what it should be). A field failing its
# check is dropped by `check_manifest` (with a note), so readers may trust the types.


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_time(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and 0 <= v <= MAX_TIME  # type: ignore[operator]


_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "schema_version": (_is_int, "an integer"),
    "run_id": (lambda v: isinstance(v, str), "a string"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "seed": (_is_int, "an integer"),
    "determinism": (lambda v: isinstance(v, dict), "an object"),
    "versions": (lambda v: isinstance(v, dict), "an object"),
    "host": (lambda v: isinstance(v, str), "a string"),
    "pid": (lambda v: _is_int(v) and 0 < v < 1 << 31, "a process id"),  # type: ignore[operator]
    "status": (lambda v: isinstance(v, str), "a string"),
    "started_at": (_is_time, "unix seconds"),
    "ended_at": (lambda v: v is None or _is_time(v), "unix seconds or null"),
    "last_step": (lambda v: _is_int(v) and 0 <= v < 1 << 63, "a step number (0 .. 2^63-1)"),  # type: ignore[operator]
    "last_checkpoint": (lambda v: v is None or isinstance(v, str), "a path or null"),
}


def check_manifest(manifest: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`manifest` with every documented field of the wrong type or range dropped (times as
    floats), and one note per dropped field. Unknown fields are kept as they are."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    for k, v in manifest.items():
        spec = _FIELDS.get(k)
        if spec is not None and not spec[0](v):
            notes.append(f"run.json: {k} should be {spec[1]}, got {safe_text(type(v).__name__)}; ignored")
            continue
        out[k] = float(v) if k in ("started_at", "ended_at") and v is not None else v
    return out, notes


def write_manifest(paths: RunPaths, manifest: Mapping[str, Any]) -> None:
    write_json_atomic(paths.manifest, manifest, root=paths.root)


def read_manifest_checked(run_dir: StrPath | RunPaths) -> tuple[dict[str, Any], list[str]]:
    """The manifest (see `read_manifest`) and the notes on the fields it dropped."""
    paths = run_dir if isinstance(run_dir, RunPaths) else RunPaths(Path(run_dir))
    shown = safe_text(paths.manifest)
    try:
        data = read_run_file(paths.root, "run.json", MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise RunDirError(f"{safe_text(paths.root)} is not a run directory (no run.json)") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunDirError(f"{shown} is corrupt (not UTF-8 text)") from None
    try:
        m = jsonl.loads(text)
    except ValueError:
        raise RunDirError(f"{shown} is corrupt (not valid JSON)") from None
    if not isinstance(m, dict):
        raise RunDirError(f"{shown} is corrupt (not a JSON object)")
    return check_manifest(m)


def read_manifest(run_dir: StrPath | RunPaths) -> dict[str, Any]:
    """`run.json` of a run dir, its documented fields type-checked (bad ones dropped: see
    `check_manifest`). Raises `RunDirError` (one line) if it is missing, not a regular file,
    over 4 MiB, not UTF-8, not JSON or not an object."""
    return read_manifest_checked(run_dir)[0]


def update_manifest(paths: RunPaths, **changes: Any) -> dict[str, Any]:
    m = read_manifest(paths)
    m.update(changes)
    write_manifest(paths, m)
    return m


def switch_latest(runs_dir: StrPath, run_id: str) -> None:
    """Point `runs/latest` at `run_id` atomically (a new link renamed over the old). An
    existing `latest` that is not a symlink (a real file or directory) is refused."""
    if not run_id or "/" in run_id or "\0" in run_id or run_id in (".", "..", "latest"):
        raise RunDirError(f"invalid run id {safe_text(repr(run_id))}")
    dfd = run_dir_fd(runs_dir)
    tmp = f".latest.{os.getpid()}.tmp"
    try:
        try:
            st = os.stat("latest", dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISLNK(st.st_mode):
                raise RunFileError(
                    f"{safe_text(os.path.join(os.fspath(runs_dir), 'latest'))} is {_kind(st.st_mode)}, "
                    "not a symlink; refusing to replace it"
                )
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        os.symlink(run_id, tmp, dir_fd=dfd)
        os.replace(tmp, "latest", src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as e:
        if isinstance(e, RunDirError):
            raise
        raise RunDirError(f"cannot point {safe_text(runs_dir)}/latest at {safe_text(run_id)}: {e.strerror}") from None
    finally:
        os.close(dfd)


class RunLock:
    """The writer's lock on a run directory (flock, released by the kernel if the process dies).

    The holder writes its pid into the lock file; `lock_holder` trusts it only while the
    lock is held."""

    def __init__(self, paths: RunPaths):
        self.paths = paths
        self._fd = -1

    def acquire(self) -> RunLock:
        try:
            fd = open_run_fd(self.paths.root, "trainerd.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except RunDirError:
            raise
        except OSError as e:
            raise RunDirError(f"cannot lock run {safe_text(self.paths.root)}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f" by pid {holder}" if holder else ""
                raise RunLockedError(
                    f"run {safe_text(self.paths.root)} is locked{who}: another trainerd is writing it"
                ) from None
            raise RunDirError(f"cannot lock run {safe_text(self.paths.root)}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0)
    except OSError:
        return None
    text = raw.strip()
    if not text.isdigit() or len(text) > 10:
        return None
    pid = int(text)
    return pid if 0 < pid < 1 << 31 else None


def _open_lock_for_probe(paths: RunPaths) -> int | None:
    """The lock file, read-only (never created: probing a read-only run dir writes nothing);
    None if it is missing or refused (a symlink, a FIFO: no writer of ours holds such a file)."""
    try:
        return open_run_fd(paths.root, "trainerd.lock", os.O_RDONLY)
    except OSError:
        return None


def _held(fd: int) -> bool:
    """Whether another open file holds the flock: a shared, non-blocking flock taken and
    released at once (it never blocks, and holds nothing for more than an instant)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def is_locked(paths: RunPaths) -> bool:
    """Whether a writer holds the run's lock (`trainerd.lock`). Never blocks a writer, never
    creates a file."""
    fd = _open_lock_for_probe(paths)
    if fd is None:
        return False
    try:
        return _held(fd)
    finally:
        os.close(fd)


def lock_holder(paths: RunPaths) -> int | None:
    """The pid of the process holding the run's writer lock, or None if the lock is free (or
    the holder has not written its pid yet). The pid is read from the lock file, written there
    by the holder, and trusted only while the lock is held: it is read between two probes
    that both find the lock held, and twice the same."""
    fd = _open_lock_for_probe(paths)
    if fd is None:
        return None
    try:
        if not _held(fd):
            return None
        pid = _read_pid(fd)
        if pid is None or not _held(fd) or _read_pid(fd) != pid:
            return None
        return pid
    finally:
        os.close(fd)


def pid_alive(pid: object) -> bool:
    if not _is_int(pid) or not 0 < pid < 1 << 31:  # type: ignore[operator]
        return False
    try:
        os.kill(pid, 0)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


_WRITER_ELSEWHERE: dict[Path, Callable[[Path], str]] = {}


def register_writer_elsewhere(root: StrPath, status: Callable[[Path], str]) -> None:
    """Runs under `root` are local copies of runs written on another host (the monitor's
    mirror of an ssh:// run): a lock there says nothing, so `status(run_dir)` decides whether
    a 'running' run still runs (its writer's heartbeat, judged by the writer host's clock:
    see `heartbeat_status`)."""
    _WRITER_ELSEWHERE[Path(os.path.realpath(root))] = status


def heartbeat_status(now: float, last_sign_of_life: float | None) -> str:
    """A 'running' run written elsewhere: 'crashed' once its last sign of life (the newest
    mtime of its SIGN_OF_LIFE_FILES: the heartbeat while the writer runs, its other files for
    a run written before the heartbeat existed) is HEARTBEAT_TIMEOUT_S old at `now`, both by
    the writer host's clock; 'running' otherwise, and while nothing is known yet."""
    if last_sign_of_life is not None and now - last_sign_of_life > HEARTBEAT_TIMEOUT_S:
        return "crashed"
    return "running"


MAX_HEARTBEAT_BYTES = 4096


def read_heartbeat(paths: RunPaths) -> dict[str, Any] | None:
    """The run's `heartbeat` as far as it can be trusted: its `time` (a finite number), and
    `phase` (text) and `last_step` (an int) when they are well formed; None when there is none,
    or it cannot be read (refused, too long, not a JSON object with a time)."""
    try:
        data = jsonl.loads(read_run_file(paths.root, HEARTBEAT_FILE, MAX_HEARTBEAT_BYTES).decode("utf-8"))
    except (OSError, ValueError):  # missing, refused (a FIFO, a link out), not UTF-8, not JSON
        return None
    if not isinstance(data, dict) or finite_value(data.get("time")) is None:
        return None
    beat: dict[str, Any] = {"time": finite_value(data["time"])}
    if isinstance(data.get("phase"), str):
        beat["phase"] = safe_text(data["phase"], 40)
    if _is_int(data.get("last_step")):
        beat["last_step"] = data["last_step"]
    return beat


def _writer_elsewhere(paths: RunPaths) -> Callable[[Path], str] | None:
    if not _WRITER_ELSEWHERE:
        return None
    here = Path(os.path.realpath(paths.root))
    for root, status in _WRITER_ELSEWHERE.items():
        if here.parent == root:
            return status
    return None


def effective_status(manifest: Mapping[str, Any], paths: RunPaths) -> str:
    """The manifest's status, except that a 'running' run whose writer lock is free is 'crashed'.

    Liveness comes from the lock only (a held flock on `trainerd.lock`), never from the
    manifest's pid: the kernel drops the lock when the writer dies, whereas a pid can be
    reused. `paths` is required. A status that is not a string is 'unknown'. A copy of a run
    written elsewhere (`register_writer_elsewhere`) is judged by its writer's heartbeat.
    """
    if not isinstance(paths, RunPaths):
        raise TypeError("effective_status(manifest, paths) needs the run's RunPaths")
    status = manifest.get("status", "unknown")
    if not isinstance(status, str):
        return "unknown"
    if status == "running":
        elsewhere = _writer_elsewhere(paths)
        if elsewhere is not None:
            return elsewhere(Path(os.path.abspath(paths.root)))
        return "running" if is_locked(paths) else "crashed"
    return status


def run_elapsed(manifest: Mapping[str, Any], status: str, last_record_time: float | None, now: float) -> float | None:
    """How long the run has run, in seconds (None without a usable `started_at`): to its
    `ended_at`, else to now while it runs, else (it ended without saying when: killed,
    crashed) to its last record. `trainerd status` and the monitor both show this."""
    started = finite_value(manifest.get("started_at"))
    if started is None:
        return None
    end = finite_value(manifest.get("ended_at"))
    if end is None:
        live = status in ("running", "stalled")
        end = now if live else finite_value(last_record_time) if last_record_time is not None else started
    return max(0.0, (end if end is not None else started) - started)


def resolve_run(path: StrPath) -> RunPaths:
    """A run dir, or a runs dir (its `latest`, else its newest run) -> the run's paths."""
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"no such run or runs dir: {safe_text(p)}")
    if not p.is_dir():
        raise RunDirError(f"not a directory: {safe_text(p)}")
    if (p / "run.json").exists():
        return RunPaths(p)
    latest = p / "latest"
    if latest.exists() and (latest / "run.json").exists():
        return RunPaths(latest)
    runs = find_runs(p)
    if runs:
        return runs[-1].paths
    raise RunDirError(f"{safe_text(p)} holds no runs (no run.json, no latest)")


@dataclass
class RunInfo:
    paths: RunPaths
    manifest: dict[str, Any]
    status: str

    @property
    def run_id(self) -> str:
        return self.paths.run_id


def find_runs(runs_dir: StrPath) -> list[RunInfo]:
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


def append_event(paths: RunPaths, event: str, **fields: Any) -> dict[str, Any]:
    """Append one lifecycle or alert event to events.jsonl (one write, one line)."""
    rec = {"event": event, "time": time.time(), **fields}
    with jsonl.JsonlWriter(paths.events, root=paths.root) as w:
        w.write(rec)
    return rec


def read_events(paths: RunPaths, stats: jsonl.LineStats | None = None) -> list[dict[str, Any]]:
    """The events of events.jsonl ([] if there is none). Lines that do not parse or are over
    `jsonl.MAX_LINE` bytes are skipped and counted in `stats` if given. Raises `RunDirError`
    if events.jsonl is not a regular file in the run dir."""
    return jsonl.read_jsonl(paths.events, root=paths.root, stats=stats)


_CHECKPOINT_DIR = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(paths: RunPaths) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first: the writer renames a finished
    temp dir to `checkpoints/step_NNNNNN`, so only complete ones have that name. A link is not
    a checkpoint. [] if there are none or the folder cannot be read."""
    try:
        entries = list(paths.checkpoints.iterdir())
    except OSError:
        return []
    out = []
    for d in entries:
        m = _CHECKPOINT_DIR.match(d.name)
        if m and not d.is_symlink() and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)
