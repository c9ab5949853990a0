"""Remote runs over plain SSH: `rlhf-tui ssh://[user@]host[:port]/path`.

Nothing is installed on the remote box. The monitor runs the user's own `ssh` (their
~/.ssh/config, agent, jump hosts and ControlMaster apply; `RLHF_SSH` replaces the command, e.g.
`RLHF_SSH="ssh -F my_config"`) with a small POSIX-sh + coreutils loop on the remote side
(`REMOTE_LOOP`). The loop streams only the new bytes of the followed run's append-only files
(steps.msgpack, events.jsonl, samples.jsonl) and the whole of run.json / alerts.json when they
change, as length-prefixed chunks on one long-lived session. The chunks are written into a local
mirror of the run dir in the per-user cache (`$XDG_CACHE_HOME/rlhf-kit/remote/...`), and the
monitor reads the mirror as a local run: nothing of the reading code is duplicated.

Resuming: the local mirror's sizes are the offsets. On every (re)connect the loop is given them
and the hex of the 32 bytes before each; a remote file that is shorter, or whose bytes there
differ (replaced), is sent again from 0 ("Z": the local copy is truncated, the readers handle a
shrink). The step log's CRC frames make a byte stream safe to resume at any offset, so a dropped
link loses or duplicates no record. The link is watched: "link down since HH:MM:SS" while it is,
reconnecting with backoff (1, 2, 4 .. 30 s), bounded by ConnectTimeout and ServerAliveInterval.

Liveness (DECISIONS): the writer's heartbeat decides, judged by the writer host's clock: the loop
reports the remote `date +%s` and the newest mtime of the run's SIGN_OF_LIFE_FILES (the
`heartbeat` file the trainer rewrites every few seconds, and the files it writes as it goes); a
"running" run whose newest of them is `HEARTBEAT_TIMEOUT` s old (remote clock) is shown as
crashed. The heartbeat itself is only stat'ed, never mirrored. The header's ages use the remote
clock too (`RemoteSync.clock`).

The remote path is always passed as one quoted argument (`shlex.quote`) and used as "$1" in
the loop: shell metacharacters in it are never run. `ssh://host/runs` is the absolute path
/runs; `ssh://host/~/runs` is relative to the remote home.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from protocol.columns import ColumnWriter, columns_path
from protocol.rundir import HEARTBEAT_TIMEOUT_S, SIGN_OF_LIFE_FILES, heartbeat_status, register_writer_elsewhere
from protocol.text import safe_text

from .system import NVSMI_FIELDS, RemoteBox

APPEND_FILES = ("steps.msgpack", "events.jsonl", "samples.jsonl")  # streamed from an offset
WHOLE_FILES = ("run.json", "alerts.json")  # small, rewritten atomically: sent whole on change
CHUNK_MAX = 4 << 20  # bytes of one file per round (the reader sees progress on a huge log)
CONNECT_TIMEOUT = 10  # seconds, ssh's ConnectTimeout
ALIVE_INTERVAL = 5  # ServerAliveInterval; with ServerAliveCountMax=3 a dead link is noticed in ~15 s
START_TIMEOUT = 30.0  # the first round must arrive in this long (else one line, exit)
BACKOFF = (1, 2, 4, 8, 15, 30)
HEARTBEAT_TIMEOUT = HEARTBEAT_TIMEOUT_S  # a "running" run whose newest sign of life is older (remote clock) crashed
PREFIX = 32  # bytes before an offset checked on resume
BOX_INTERVAL = 2  # seconds between samples of the remote box (nvidia-smi, /proc): tui/system.py
REMOTE_TOOLS = ("tail", "head", "stat", "od", "tr", "sort", "date", "sleep")


class RemoteError(Exception):
    """Why a remote run cannot be watched, in one line."""


@dataclass(frozen=True)
class RemoteTarget:
    host: str
    path: str  # as the remote shell gets it: absolute, or relative to the home
    user: str | None = None
    port: int | None = None

    @property
    def display(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        path = self.path if self.path.startswith("/") else "~/" + self.path.removeprefix("./")
        return f"ssh://{user}{self.host}{port}{path}"


_URL = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>[^/]*))?(?P<path>/.*)?$")


def is_remote(target: str) -> bool:
    return target.startswith("ssh://")


def parse_target(url: str) -> RemoteTarget:
    """ssh://[user@]host[:port]/path -> RemoteTarget. `/runs` is absolute, `/~/runs` is relative
    to the remote home (`~` alone: the home)."""
    m = _URL.match(url)
    if m is None or not m.group("host"):
        raise RemoteError(f"not an ssh://[user@]host[:port]/path address: {safe_text(url, 200)}")
    host = m.group("host").strip("[]")
    if host.startswith("-"):
        raise RemoteError(f"bad host name: {safe_text(host, 100)}")
    port = None
    if m.group("port"):
        if not m.group("port").isdigit() or not 0 < int(m.group("port")) < 65536:
            raise RemoteError(f"bad port in {safe_text(url, 200)}")
        port = int(m.group("port"))
    raw = unquote(m.group("path") or "/~")
    if "\0" in raw or "\n" in raw:
        raise RemoteError(f"bad path in {safe_text(url, 200)}")
    if raw == "/~" or raw == "/~/":
        path = "."
    elif raw.startswith("/~/"):
        path = raw[3:].rstrip("/") or "."
    else:
        path = raw.rstrip("/") or "/"
    user = unquote(m.group("user")) if m.group("user") else None
    if user is not None and user.startswith("-"):
        raise RemoteError(f"bad user name: {safe_text(user, 100)}")
    return RemoteTarget(host=host, path=path, user=user, port=port)


def ssh_command(t: RemoteTarget) -> list[str]:
    """The user's ssh (RLHF_SSH, default `ssh`) with bounded timeouts and no prompts (these -o
    win over their config; everything else of it applies: hosts, keys, jumps, ControlMaster)."""
    base = shlex.split(os.environ.get("RLHF_SSH", "") or "ssh")
    opts = [
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        "-o", f"ServerAliveInterval={ALIVE_INTERVAL}",
        "-o", "ServerAliveCountMax=3",
        "-T",
    ]  # fmt: skip
    if t.port:
        opts += ["-p", str(t.port)]
    if t.user:
        opts += ["-l", t.user]
    return base + opts + ["--", t.host]


# The remote side: POSIX sh + coreutils. Arguments: path, run to follow ("" = resolve: the run
# itself, the runs dir's `latest`, else its newest run), interval, then per append file
# "offset hex-of-the-bytes-before". Output: lines, some followed by exactly n bytes:
#   E <text>              fatal, one line          K <run|runs> <run id>   what is followed
#   A <file> <off> <n> <size>  n new bytes at off (of size)   Z <file>    sent again from 0
#   W <file> <n>          the whole file           R <n> <mtime> <run id>  another run's run.json
#   H <mtime> <run id>    another run's newest sign-of-life file time (its heartbeat), when it changed
#   T <now> <newest>      remote clock, newest mtime of the run's sign-of-life files
#   D                     a round that sent something is done          L <run id>   where `latest` points
#   Y <tag> <text>        the box (tui/system.py, RemoteBox), every BOX_INTERVAL s: Y G <nvidia-smi CSV line>
#                         per GPU (or Y N <why none>), Y C <cpu line of /proc/stat>, Y M <MemTotal kB>
#                         <MemAvailable kB>, then Y E
_LOOP_VALUES = {
    "tools": " ".join(REMOTE_TOOLS),
    "prefix": PREFIX,
    "chunk": CHUNK_MAX,
    "box": BOX_INTERVAL,
    "fields": ",".join(NVSMI_FIELDS),
    # plain names of the run dir (no quoting needed): stat'ed in the followed run, and in another run "$d"
    "life": " ".join(SIGN_OF_LIFE_FILES),
    "life_of_d": " ".join(f'"$d/{name}"' for name in SIGN_OF_LIFE_FILES),
}
_LOOP_TEMPLATE = r"""
for t in %(tools)s; do
  command -v "$t" >/dev/null 2>&1 || { echo "E the remote box has no '$t' (needed: %(tools)s)"; exit 3; }
done
stat -c %%s / >/dev/null 2>&1 || { echo "E the remote 'stat' does not take -c (GNU or BusyBox needed)"; exit 3; }
P=$1; RUN=$2; IV=$3; shift 3
if [ ! -e "$P" ]; then echo "E no such remote path: $P"; exit 4; fi
cd -- "$P" 2>/dev/null || { echo "E cannot enter the remote path: $P"; exit 4; }
if [ -f run.json ]; then KIND=run; D=$(pwd -P); RUN=${D##*/}; cd .. || exit 4
else
  KIND=runs
  if [ -z "$RUN" ] && [ -f latest/run.json ]; then L=$(cd latest && pwd -P); RUN=${L##*/}; fi
  if [ -z "$RUN" ]; then for d in *; do [ -f "$d/run.json" ] && RUN=$d; done; fi
  if [ -z "$RUN" ]; then echo "E no runs in the remote path (no run.json, no latest): $P"; exit 4; fi
fi
[ -d "$RUN" ] || { echo "E no such remote run: $RUN"; exit 4; }
echo "K $KIND $RUN"
o1=$1 h1=$2 o2=$3 h2=$4 o3=$5 h3=$6
pre() {
  s=$(( $2 > %(prefix)d ? $2 - %(prefix)d : 0 ))
  tail -c +$((s+1)) -- "$1" 2>/dev/null | head -c $(($2-s)) | od -An -tx1 | tr -d ' \n'
}
exact() { { "$@"; head -c "$N" /dev/zero; } | head -c "$N"; }
app() {
  f=$RUN/$1; eval "o=\$o$2 h=\$h$2"
  [ -f "$f" ] && [ ! -L "$f" ] || return 0
  n=$(stat -c %%s -- "$f") || return 0
  if [ "$o" -gt 0 ] && { [ "$n" -lt "$o" ] || { [ -n "$h" ] && [ "$h" != "$(pre "$f" "$o")" ]; }; }; then
    echo "Z $1"; o=0
  fi
  h=
  if [ "$n" -gt "$o" ]; then
    N=$((n-o)); [ "$N" -gt %(chunk)d ] && N=%(chunk)d
    echo "A $1 $o $N $n"; exact tail -c +$((o+1)) -- "$f"; o=$((o+N)); C=1
    [ "$o" -lt "$n" ] && MORE=1
  fi
  eval "o$2=\$o h$2="
}
whole() {
  f=$RUN/$1; eval "p=\$w$2"
  [ -L "$f" ] && return 0
  s=$(stat -c '%%i %%s %%Y' -- "$f" 2>/dev/null) || s=-
  [ "$s" = "$p" ] && return 0
  eval "w$2=\$s"; [ "$s" = - ] && return 0
  N=${s#* }; N=${N%%%% *}; echo "W $1 $N"; exact cat -- "$f"; C=1
}
runs() {
  for d in *; do
    [ "$d" = "$RUN" ] || [ "$d" = latest ] && continue; [ -f "$d/run.json" ] || continue
    case $d in *"
"*) continue;; esac
    s=$(stat -c '%%i %%s %%Y' -- "$d/run.json" 2>/dev/null) || continue
    m=$(stat -c %%Y -- %(life_of_d)s 2>/dev/null | sort -n | tail -n 1)
    case "$SEEN" in
      *"|$d=$s|"*) case "$BEATS" in *"|$d=$m|"*) ;; *) echo "H $m $d";; esac ;;
      *) N=${s#* }; N=${N%%%% *}; echo "R $N $m $d"; exact cat -- "$d/run.json" ;;
    esac
    NEW="$NEW|$d=$s|"; NB="$NB|$d=$m|"
  done
  SEEN=$NEW; BEATS=$NB
}
box() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    TO=; command -v timeout >/dev/null 2>&1 && TO="timeout 5"
    $TO nvidia-smi --query-gpu=%(fields)s --format=csv,noheader,nounits 2>&1 | head -n 64 |
      while IFS= read -r l; do echo "Y G $l"; done
  else echo "Y N no GPU seen (no nvidia-smi on the remote PATH)"; fi
  if [ -r /proc/stat ]; then read -r l < /proc/stat; echo "Y C $l"; fi
  if [ -r /proc/meminfo ]; then
    mt=; ma=
    while read -r k v u; do case $k in MemTotal:) mt=$v;; MemAvailable:) ma=$v;; esac; done < /proc/meminfo
    echo "Y M $mt $ma"
  fi
  echo "Y E"
}
SEEN=; BEATS=; LAST_L=; i=0; beat=; NEXTBOX=0
while :; do
  if [ %(box)d -gt 0 ]; then
    now=$(date +%%s); if [ "$now" -ge "$NEXTBOX" ]; then box; NEXTBOX=$((now + %(box)d)); fi
  fi
  C=; MORE=
  whole run.json 1; whole alerts.json 2
  app steps.msgpack 1; app events.jsonl 2; app samples.jsonl 3
  m=$(cd -- "$RUN" && stat -c %%Y -- %(life)s 2>/dev/null | sort -n | tail -n 1)
  if [ -n "$C" ] || [ "$m" != "$beat" ] || [ $((i %% 10)) -eq 0 ]; then echo "T $(date +%%s) $m"; beat=$m; fi
  if [ "$KIND" = runs ] && [ $((i %% 5)) -eq 0 ]; then
    NEW=; NB=; runs
    if [ -f latest/run.json ]; then
      L=$(cd latest && pwd -P); L=${L##*/}; [ "$L" != "$LAST_L" ] && { echo "L $L"; LAST_L=$L; C=1; }
    fi
  fi
  [ -n "$C" ] || [ "$i" -eq 0 ] && echo D
  i=$((i+1)); [ -n "$MORE" ] || sleep "$IV"
done
"""
REMOTE_LOOP = _LOOP_TEMPLATE % _LOOP_VALUES


def remote_loop(box_interval: int = BOX_INTERVAL) -> str:
    """The loop with the box sampled every `box_interval` s (0: never; `rlhf-tui --no-box`)."""
    return REMOTE_LOOP if box_interval == BOX_INTERVAL else _LOOP_TEMPLATE % {**_LOOP_VALUES, "box": box_interval}


_LISTING = "command -v trainerd >/dev/null 2>&1 && echo yes || echo no"


def remote_shell_command(script: str, *args: str) -> str:
    """One command line for the remote login shell: `sh -c SCRIPT rlhf ARGS...`, every part
    quoted, so no argument (the remote path) is ever parsed as shell syntax."""
    return " ".join(shlex.quote(x) for x in ("sh", "-c", script, "rlhf-remote", *args))


def ssh_error(stderr: str, rc: int | None) -> str:
    """ssh's own complaint as one line (its last meaningful stderr line)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    if lines:
        return safe_text(lines[-1], 300)
    return f"ssh ended (exit code {rc}) without a word"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlhf-kit" / "remote"


def _safe_part(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", s)[:80] or "_"


@dataclass
class Liveness:
    remote_now: float | None = None  # the remote clock at the last tick
    local_at: float = 0.0  # the local monotonic time of that tick
    newest: float | None = None  # newest mtime of the followed run's files (remote clock)
    others: dict[str, tuple[float, float]] = field(default_factory=dict)  # run id -> (remote now, newest)


class MirrorColumns:
    """Keeps the followed run's `steps.cols` in the mirror up to date with its mirrored log.

    The remote side file is never copied (it would double the traffic): the rows are made
    here, by `protocol.columns.ColumnWriter`, from the log bytes the mirror just wrote, in a
    thread of its own, so building them never delays the log mirror (a long first copy, or a
    mirror left by an older monitor, is decoded while the bytes stream in). The reading thread
    only says what happened: `grown()` after log bytes were appended, `reset()` once the log
    was truncated (a remote log that shrank or was replaced, re-sent from 0; said after the
    truncation, so a reopen never sees the old log again), `follow()` when another run is
    mirrored. A frame still incomplete at the end of a chunk is taken once the
    next chunk completes it (`ColumnWriter.catch_up` covers whole frames only). Any failure
    only stops the side file (readers check every row against the log and decode the rest).

    A side file left from before (this monitor's last session) is continued only if the crc32
    of the mirrored log up to its last row is the one that row records; else it is rebuilt. On
    a reset the rows of a prefix the new log still holds byte for byte are kept, the rest rebuilt.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._run_dir: Path | None = None
        self._gen = 0  # bumped on follow() and reset(): the writer is reopened (checked against the log)
        self._dirty = False  # grown() since the thread last looked
        self._busy = False
        self._done_gen = -1  # the generation the thread last finished a pass for
        self._closed = False
        self._writer: ColumnWriter | None = None
        self._thread: threading.Thread | None = None
        self.end = 0  # the log offset the rows cover (tests, benchmarks)
        self.broken = False  # the side file stopped (a damaged frame, a failure writing it)
        self.rebuilds = 0  # side files dropped and rebuilt from the log (tests)
        self.cpu_s = 0.0  # CPU time of this thread (benchmarks)

    def follow(self, run_dir: Path) -> None:
        with self._cond:
            if run_dir == self._run_dir:
                return
            self._run_dir = run_dir
            self._bump()
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="rlhf-tui-remote-cols", daemon=True)
                self._thread.start()

    def grown(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def reset(self) -> None:
        with self._cond:
            self._bump()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._bump()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1)

    def settled(self, timeout: float) -> bool:
        """Whether the thread has caught up with everything it was told (waits up to `timeout`)."""
        with self._cond:
            return self._cond.wait_for(self._is_settled, timeout)

    def _is_settled(self) -> bool:
        return (
            self._closed
            or self._run_dir is None
            or (not self._dirty and not self._busy and self._done_gen == self._gen)
        )

    def _bump(self) -> None:
        self._gen += 1
        w = self._writer
        if w is not None:
            w.broken = True  # a long catch-up of the old log ends at its next frame
        self._cond.notify_all()

    def _loop(self) -> None:
        t0 = time.thread_time()
        gen = -1
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._dirty and gen == self._gen:
                        self._done_gen, self._busy = gen, False
                        self._cond.notify_all()
                        self._cond.wait()
                    if self._closed:
                        return
                    self._dirty, self._busy = False, True
                    reopen, gen, run_dir = gen != self._gen, self._gen, self._run_dir
                    writer = None if reopen else self._writer
                if run_dir is None:
                    continue
                try:
                    if writer is None:
                        self._close_writer()
                        writer = self._open(run_dir, gen)
                    else:
                        writer.catch_up(run_dir / "steps.msgpack")
                except Exception:  # never the mirror's problem: readers decode the log
                    pass
                self.end, self.broken = (writer.end, writer.broken) if writer is not None else (0, False)
                self.cpu_s = time.thread_time() - t0
        finally:
            self._close_writer()
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _close_writer(self) -> None:
        with self._cond:
            w, self._writer = self._writer, None
        if w is not None:
            w.close()

    def _open(self, run_dir: Path, gen: int) -> ColumnWriter | None:
        log = run_dir / "steps.msgpack"
        cols = columns_path(log)
        try:
            size = os.stat(log).st_size
        except OSError:
            return None  # no log mirrored yet: grown() comes with its first bytes
        w = ColumnWriter(cols, run_dir, log, size)
        if w.end and not self._log_crc_is(log, w.end, w.log_crc):
            w.close()  # rows of another log (replaced, re-sent): rebuilt from this one
            self.rebuilds += 1
            w = ColumnWriter(cols, run_dir, log, 0)  # "the log is empty": the file is emptied
        with self._cond:
            if gen != self._gen:
                w.broken = True  # a reset came while it opened: the loop opens it again
            self._writer = w
        w.catch_up(log)  # what arrived while it opened
        return w

    @staticmethod
    def _log_crc_is(log: Path, end: int, crc: int) -> bool:
        try:
            with open(log, "rb", buffering=0) as f:
                got, pos = 0, 0
                while pos < end:
                    b = os.pread(f.fileno(), min(1 << 20, end - pos), pos)
                    if not b:
                        return False
                    got, pos = zlib.crc32(b, got), pos + len(b)
            return got == crc
        except OSError:
            return False


class RemoteSync:
    """Keeps a local mirror of a remote run dir up to date over one ssh session at a time."""

    def __init__(
        self,
        target: RemoteTarget,
        interval: float = 1.0,
        mirror: Path | None = None,
        box: bool = True,
        columns: bool = True,
    ):
        self.target = target
        self.loop = remote_loop(BOX_INTERVAL if box else 0)
        self.interval = interval
        self.mirror = mirror or cache_root() / _safe_part(
            f"{target.user + '@' if target.user else ''}{target.host}-{target.port or 22}"
        ) / _safe_part(target.path.strip("/").replace("/", "_") or "root")
        self.kind: str | None = None  # "run" or "runs"
        self.run_id: str | None = None
        self.live = Liveness()
        self.link_down_since: float | None = None  # wall time the link dropped
        self.error: str = ""  # the last failure, one line
        self.fatal: str = ""  # a failure reconnecting cannot mend (no path, no tail)
        self.connects = 0
        self.rounds = 0  # rounds that sent something (tests, benchmarks)
        self.bytes_in = 0  # bytes of chunks and lines read from ssh
        self.payload_in = 0  # of which file bytes
        self.payload_by_file: dict[str, int] = {}
        self.remote_sizes: dict[str, int] = {}  # of the followed run's files, as last sent
        self.on_link: Callable[[str], None] | None = None  # "link down since ..." / "" (any thread)
        self.on_data: Callable[[], None] | None = None
        self.box = RemoteBox()  # the remote box's GPUs, CPU and RAM (its on_sample: any thread)
        # the followed run's steps.cols, built here from the mirrored log (never copied)
        self.columns: MirrorColumns | None = MirrorColumns() if columns else None
        self._want_run: str = ""
        self._switching = False  # the session is being ended to follow another run
        self._offsets_for = ""  # the run whose mirror sizes the loop was given
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._first = threading.Event()
        self._lock = threading.Lock()
        self._trainerd: bool | None = None
        self._lock_fd: int | None = None
        self._private = False  # a mirror of this process only (another monitor holds the shared one)

    # -- what the monitor asks ---------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT, progress: Callable[..., None] | None = None) -> Path:
        """Connect, mirror what the run holds (`progress(bytes, of)` while a long log comes), then
        keep the mirror up to date in a thread. The local path to watch (the mirrored run dir or
        runs dir); RemoteError in one line."""
        self._claim_mirror()
        register_writer_elsewhere(self.mirror, self.writer_status)
        threading.Thread(target=self._run, name="rlhf-tui-remote", daemon=True).start()
        if not self._first.wait(timeout):
            self.close()
            raise RemoteError(f"{self.target.display}: no answer in {timeout:.0f} s")
        if self.fatal or not self.rounds:
            self.close()
            raise RemoteError(self.fatal or self.error or "the remote run could not be read")
        self._catch_up(progress, timeout)
        return self.local_target()

    def _catch_up(self, progress: Callable[..., None] | None, stall: float) -> None:
        """A long remote log is mirrored before the monitor opens it (rounds without a pause),
        so the monitor reads its tail first and its history from local disk. Ends when the
        mirror holds what the log had, or when nothing arrived for `stall` seconds."""
        assert self.run_id is not None
        path = self.mirror / self.run_id / "steps.msgpack"
        last, last_change, said = -1, time.monotonic(), 0.0
        while not self._stop.is_set():
            total = self.remote_sizes.get("steps.msgpack", 0)
            try:
                have = path.stat().st_size
            except OSError:
                have = 0
            if have >= total:
                break
            if have != last:
                last, last_change = have, time.monotonic()
            elif time.monotonic() - last_change > stall:
                return  # the link is slow or down: the monitor shows what is there, and follows
            if progress is not None and time.monotonic() - said > 0.5:
                said = time.monotonic()
                progress(have, total)
            time.sleep(0.05)
        self._columns_catch_up(stall, progress, path)

    def _columns_catch_up(self, stall: float, progress=None, log: Path | None = None) -> None:
        """The side file is built while the log streams in (another thread); when the log is
        copied, wait for its last rows too, so the monitor loads the whole history from it:
        bounded, as long as the rows keep coming (no longer than `stall` s without progress)."""
        cols = self.columns
        if cols is None:
            return
        last, last_change, said = -1, time.monotonic(), time.monotonic()
        while not self._stop.is_set() and not cols.settled(0.1):
            if cols.end != last:
                last, last_change = cols.end, time.monotonic()
            elif time.monotonic() - last_change > stall:
                return
            if progress is not None and log is not None and time.monotonic() - said > 0.5:
                said = time.monotonic()
                try:
                    progress(cols.end, log.stat().st_size, "indexing the mirrored step log")
                except OSError:
                    pass

    def _claim_mirror(self) -> None:
        """The mirror is kept between sessions (a restart sends only new bytes), for one monitor
        at a time (an flock beside it); a second monitor of the same address gets its own."""
        base = self.mirror.parent
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (cache_root().parent, cache_root(), base):
            try:
                if d.is_dir() and d.stat().st_uid == os.getuid():
                    d.chmod(0o700)  # run contents of other users' boxes: this user's only
            except OSError:
                pass
        fd = os.open(base / f".{self.mirror.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd  # held until this process ends
            self.mirror.mkdir(exist_ok=True, mode=0o700)
        except OSError:
            os.close(fd)
            self.mirror = Path(tempfile.mkdtemp(prefix=f"{self.mirror.name}.", dir=base))
            self._private = True

    def local_target(self) -> Path:
        assert self.run_id is not None
        return self.mirror if self.kind == "runs" else self.mirror / self.run_id

    def follow(self, run_dir: Path) -> None:
        """The monitor opened another run of the mirror (picker, `latest` moved): stream it."""
        if Path(os.path.realpath(run_dir.parent)) != Path(os.path.realpath(self.mirror)) or run_dir.name == self.run_id:
            return
        self._want_run = run_dir.name
        self._switching = True
        self._restart()

    def close(self) -> None:
        self._stop.set()
        self._restart()
        if self.columns is not None:
            self.columns.close()
        if self._private:
            shutil.rmtree(self.mirror, ignore_errors=True)
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def clock(self) -> float:
        """Now by the writer host's clock (the local clock until the first tick)."""
        lv = self.live
        if lv.remote_now is None:
            return time.time()
        return lv.remote_now + (time.monotonic() - lv.local_at)

    def writer_status(self, run_dir: Path) -> str:
        """A 'running' run of the mirror: running while its heartbeat (or its other files)
        changes, by the remote clock."""
        lv = self.live
        if run_dir.name == self.run_id:
            newest = lv.newest
        elif run_dir.name in lv.others:
            newest = lv.others[run_dir.name][1]
        else:
            return "running"
        # while the link is down, judged as of the last word from the writer's host: a run is
        # not "crashed" because the laptop lost its link
        down = self.link_down_since is not None and lv.remote_now is not None
        return self._judge(lv.remote_now if down and lv.remote_now is not None else self.clock(), newest)

    @staticmethod
    def _judge(now: float, newest: float | None) -> str:
        """'crashed' once the run's newest sign-of-life file time is HEARTBEAT_TIMEOUT old at `now`."""
        return heartbeat_status(now, newest)

    def has_trainerd(self) -> bool:
        """Whether `trainerd` is on the remote PATH (asked once, over the same ssh)."""
        if self._trainerd is None:
            try:
                out = subprocess.run(
                    ssh_command(self.target) + [remote_shell_command(_LISTING)],
                    capture_output=True,
                    text=True,
                    timeout=CONNECT_TIMEOUT + 10,
                    stdin=subprocess.DEVNULL,
                )
                self._trainerd = out.stdout.strip().endswith("yes")
            except (OSError, subprocess.TimeoutExpired):
                return False
        return self._trainerd

    def verify_command(self, check: str) -> list[str]:
        """`trainerd verify CHECK --json RUN` run on the remote box, over the same ssh."""
        run = self._remote_run_path()
        return ssh_command(self.target) + [
            " ".join(shlex.quote(x) for x in ("trainerd", "verify", check, "--json", run))
        ]

    def _remote_run_path(self) -> str:
        if self.kind == "run":
            return self.target.path
        return f"{self.target.path.rstrip('/')}/{self.run_id}"

    # -- the session -----------------------------------------------------------------------

    def _restart(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass

    def _args(self) -> list[str]:
        """The loop's arguments: the offsets (and the bytes before them) are the mirror's sizes
        of the run it will follow: the one asked for, else the one followed, else a guess (the
        mirror's `latest`, or the run dir named in the address) that K confirms or not."""
        run = self._want_run or self.run_id or self._guess_run()
        self._offsets_for = run
        args = [self.target.path, self._want_run or (self.run_id or ""), f"{self.interval:g}"]
        for name in APPEND_FILES:
            off, pre = 0, ""
            if run:
                try:
                    with open(self.mirror / run / name, "rb") as f:
                        off = os.fstat(f.fileno()).st_size
                        start = max(0, off - PREFIX)
                        f.seek(start)
                        pre = f.read(off - start).hex()
                except OSError:
                    off, pre = 0, ""
            args += [str(off), pre]
        return args

    def _guess_run(self) -> str:
        try:
            return os.readlink(self.mirror / "latest")
        except OSError:
            name = self.target.path.rstrip("/").rsplit("/", 1)[-1]
            return name if (self.mirror / name / "run.json").is_file() else ""

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            ok = self._session()
            if self._stop.is_set():
                break
            if self.fatal and not self._first.is_set():
                self._first.set()
                return
            if not self._first.is_set():
                self._first.set()  # the first connect failed: start() reports self.error
                return
            if ok:  # a planned restart (another run, `latest` moved): at once
                attempt = 0
                continue
            if self.link_down_since is None:
                self.link_down_since = time.time()
            self._say_link()
            if time.monotonic() - started > 20:
                attempt = 0
            delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
            attempt += 1
            self._stop.wait(delay)

    def _say_link(self) -> None:
        if self.on_link is None:
            return
        if self.link_down_since is None:
            self.on_link("")
        else:
            since = time.strftime("%H:%M:%S", time.localtime(self.link_down_since))
            err = f": {self.error}" if self.error else ""
            self.on_link(f"link to {self.target.host} down since {since}{err}; reconnecting")

    def _session(self) -> bool:
        """One ssh session; True if it ended as planned (a switch of run), False if it dropped."""
        cmd = ssh_command(self.target) + [remote_shell_command(self.loop, *self._args())]
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
        except OSError as e:
            self.fatal = self.error = f"cannot run ssh ({safe_text(cmd[0], 100)}): {e.strerror or e}"
            return False
        with self._lock:
            self._proc = proc
        self.connects += 1
        err: list[bytes] = []
        threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()  # type: ignore[union-attr]
        planned = False
        try:
            self._read(proc)
        except (OSError, ValueError, _Desync) as e:
            self.error = f"the remote stream broke off: {safe_text(str(e), 200)}"
        finally:
            try:
                proc.kill()
            except OSError:
                pass
            rc = proc.wait()
            planned, self._switching = self._switching, False
            for _ in range(20):
                if err:
                    break
                time.sleep(0.01)
        if not planned and not self.fatal and not self._stop.is_set():
            text = (err[0] if err else b"").decode(errors="replace")
            if rc == 255 or not self.error:
                self.error = ssh_error(text, rc)
        return planned

    def _read(self, proc: subprocess.Popen) -> None:
        out = proc.stdout
        assert out is not None
        run_dir: Path | None = None
        while True:
            line = out.readline()
            if not line:
                return
            self.bytes_in += len(line)
            parts = line.decode("utf-8", "replace").rstrip("\n").split(" ")
            tag = parts[0]
            if tag == "E":
                self.fatal = self.error = safe_text(" ".join(parts[1:]), 300)
                return
            if tag == "Y":
                self.box.feed(line.decode("utf-8", "replace").rstrip("\n")[2:])
                continue
            if tag == "K":
                self.kind, run_id = parts[1], " ".join(parts[2:])
                if run_id != self.run_id:
                    self.run_id = run_id
                    self.live = Liveness(others=self.live.others)
                self._want_run = ""
                run_dir = self.mirror / run_id
                run_dir.mkdir(parents=True, exist_ok=True)
                if run_id != self._offsets_for:  # the loop was given no offsets for it: from 0
                    for name in APPEND_FILES:
                        if (run_dir / name).exists():
                            with open(run_dir / name, "wb"):
                                pass
                    if self.columns is not None:  # after the truncation: the side file is reopened on it
                        self.columns.reset()
                if self.columns is not None:  # its side file: continued, or built from the mirrored log
                    self.columns.follow(run_dir)
                continue
            if run_dir is None:
                raise _Desync(f"unexpected {safe_text(line[:40].decode(errors='replace'))!r}")
            if tag == "A":
                name, off, n = parts[1], int(parts[2]), int(parts[3])
                if len(parts) > 4:
                    self.remote_sizes[name] = int(parts[4])
                self._check_name(name, APPEND_FILES)
                data = self._exact(out, n, name)
                path = run_dir / name
                size = path.stat().st_size if path.exists() else 0
                if off != size:
                    raise _Desync(f"{name}: chunk at {off}, mirror has {size}")
                with open(path, "ab") as f:
                    f.write(data)
                if name == "steps.msgpack" and self.columns is not None:
                    self.columns.grown()  # a notification: never waits for the side file
                self._data()
            elif tag == "Z":
                self._check_name(parts[1], APPEND_FILES)
                with open(run_dir / parts[1], "wb"):
                    pass
                if parts[1] == "steps.msgpack" and self.columns is not None:
                    # after the truncation (a reopen before it would continue the old log's rows):
                    # rebuilt from the log sent again, the rows of a prefix it still holds kept
                    self.columns.reset()
            elif tag == "W":
                name, n = parts[1], int(parts[2])
                self._check_name(name, WHOLE_FILES)
                self._write_whole(run_dir / name, self._exact(out, n, name))
                self._data()
            elif tag == "R":
                n, m, rid = int(parts[1]), parts[2], " ".join(parts[3:])
                data = self._exact(out, n, "other runs' run.json")
                if self._other_run(rid):
                    (self.mirror / rid).mkdir(exist_ok=True)
                    self._write_whole(self.mirror / rid / "run.json", data)
                    self._beat(rid, m)
            elif tag == "H":
                rid = " ".join(parts[2:])
                if self._other_run(rid):
                    self._beat(rid, parts[1])
            elif tag == "T":
                self.live.remote_now = float(parts[1])
                self.live.local_at = time.monotonic()
                if len(parts) > 2 and parts[2].isdigit():
                    self.live.newest = float(parts[2])
            elif tag == "D":
                if self.link_down_since is not None or self.error:
                    self.link_down_since, self.error, self.fatal = None, "", ""
                    self._say_link()
                self.rounds += 1
                self._first.set()
            elif tag == "L":
                rid = " ".join(parts[1:])
                if rid and "/" not in rid and (self.mirror / rid / "run.json").exists():
                    self._point_latest(rid)
            else:
                raise _Desync(f"unexpected {safe_text(line[:40].decode(errors='replace'))!r}")

    @staticmethod
    def _other_run(rid: str) -> bool:
        return bool(rid) and "/" not in rid and rid not in (".", "..", "latest") and not rid.startswith(".")

    def _beat(self, rid: str, mtime: str) -> None:
        if mtime.isdigit():
            self.live.others[rid] = (self.live.remote_now or time.time(), float(mtime))

    def _exact(self, out, n: int, name: str) -> bytes:
        data = out.read(n)
        if len(data) != n:
            raise _Desync("the link closed inside a chunk")
        self.bytes_in += n
        self.payload_in += n
        self.payload_by_file[name] = self.payload_by_file.get(name, 0) + n
        return data

    @staticmethod
    def _check_name(name: str, allowed: tuple[str, ...]) -> None:
        if name not in allowed:
            raise _Desync(f"unexpected file {safe_text(name, 40)!r}")

    def _data(self) -> None:
        if self.on_data is not None:
            self.on_data()

    @staticmethod
    def _write_whole(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _point_latest(self, run_id: str) -> None:
        link = self.mirror / "latest"
        try:
            if os.readlink(link) == run_id:
                return
        except OSError:
            pass
        tmp = self.mirror / ".latest.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(run_id, tmp)
            os.replace(tmp, link)
        except OSError:
            pass


class _Desync(Exception):
    pass


def open_remote(
    url: str, interval: float = 1.0, progress: Callable[..., None] | None = None, box: bool = True
) -> RemoteSync:
    """Parse, connect, mirror what is there: a running RemoteSync, or RemoteError (one line)."""
    sync = RemoteSync(parse_target(url), interval=interval, box=box)
    sync.start(progress=progress)
    return sync


def attach(app, sync: RemoteSync) -> None:
    """Wire a RemoteSync into a MonitorApp: the banner says when the link is down, a run opened
    from the mirror (run picker, `latest` moved) is streamed, the verify buttons run there."""
    app.remote = sync
    open_run = app.open_run

    def open_and_follow(paths) -> None:
        sync.follow(Path(paths.root))
        open_run(paths)

    app.open_run = open_and_follow

    def show(text: str) -> None:
        app.model.link = text
        app._changed({"alerts"})

    def on_link(text: str) -> None:
        try:
            app.call_from_thread(show, text)
        except Exception:  # the app is not running (yet, or any more)
            app.model.link = text

    sync.on_link = on_link
    if getattr(app, "box_sampling", False):  # the remote box's GPUs, CPU and RAM, over the same session
        sync.box.on_sample = app.box_from_thread
