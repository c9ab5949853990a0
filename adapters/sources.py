"""Reading other frameworks' runs as kit step records, live.

`detect(path)` recognises, besides a kit run dir (which callers try first):

- a TensorBoard log dir (event files `events.out.tfevents.*`, as written by TRL through
  transformers `report_to="tensorboard"`, OpenRLHF `--use_tensorboard`, veRL's tensorboard
  logger), read incrementally with tensorboard's own `EventFileLoader`, one loader per file
  kept open across polls;
- veRL's file logger output (`{"step": N, "data": {...}}` per line; `$VERL_FILE_LOGGER_PATH`,
  or `$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl`): the file, or a dir holding such files
  (the newest is read);
- a JSONL or CSV of per-step metrics with a mapping file `rlhf-map.toml` (see `MAPPING_HELP`).

Each source's `poll()` returns the kit records that completed since the last call: a step's
values are held until a later step shows up or the files have been quiet for `QUIET_S`, since
a framework may log one step in several writes. Records have `step`, `time`, the catalogue
fields the framework's alias table maps (`adapters.aliases`), `stage_s` when it logs stage
timings, and every other numeric metric under its own name.

Adapted runs have no writer lock: `status()` is "live" while the files grow and "idle" once
they have not grown for `IDLE_AFTER_S`, never "running".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocol.catalogue import METRICS, STAGES
from protocol.text import safe_text

from .aliases import KIT, OWN_FIELDS, STAGE, TABLES, Table, guess_framework, map_metrics, missing_fields

LOOKED_FOR = (
    "a kit run dir (run.json), a TensorBoard log dir (events.out.tfevents.*), a veRL file-logger "
    'JSONL ({"step": N, "data": {...}} lines) or a metrics JSONL/CSV with an rlhf-map.toml mapping'
)
MAPPING_FILE = "rlhf-map.toml"
MAPPING_HELP = """\
rlhf-map.toml, beside the metrics file (or given as PATH):
    file = "metrics.csv"        # the JSONL or CSV, relative to this file
    framework = "my-trainer"    # optional: shown in the monitor's header
    step = "iteration"          # the column holding the step (default "step")
    time = "wall_time"          # optional: unix seconds (default: when the line was read)
    [metrics]                   # kit catalogue field = your column
    kl = "train/kl"
    reward_mean = "train/reward"
    [stages]                    # profiler stage = your column (seconds)
    rollout = "time/generate"
"""
QUIET_S = 2.0  # a step's values are complete once nothing came for this long
IDLE_AFTER_S = 60.0  # a run whose files have not grown for this long is "idle"
MAX_LINE = 1 << 20  # JSONL / CSV lines longer than this are skipped
MAX_DEPTH = 4  # how deep a TensorBoard dir is searched for event files
MAX_ENTRIES = 20000  # directory entries looked at while detecting


class SourceError(Exception):
    """A path or mapping file that cannot be read as a run (one line)."""


def _open_regular(path: Path) -> io.BufferedReader:
    """Open a regular file for reading: never through a final symlink, never blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{safe_text(path)} is not a regular file: not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


def _first_line(path: Path, limit: int = 64 << 10) -> bytes:
    try:
        with _open_regular(path) as f:
            return f.read(limit).split(b"\n", 1)[0]
    except (OSError, SourceError):
        return b""


def _is_verl_line(line: bytes) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("step"), int) and isinstance(obj.get("data"), dict)


# -- assembling steps from values that arrive one by one -----------------------------------------------


class StepAssembler:
    """Values keyed by step -> complete raw metric dicts, in step order."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[str, Any]] = {}
        self.times: dict[int, float] = {}
        self.done_through: int | None = None  # the last step handed out
        self.late = 0  # values for a step already handed out (dropped, counted)
        self.last_add = 0.0

    def add(self, step: int, values: dict[str, Any], wall_time: float | None) -> None:
        if self.done_through is not None and step <= self.done_through:
            self.late += 1
            return
        self.pending.setdefault(step, {}).update(values)
        if wall_time is not None:
            self.times[step] = max(self.times.get(step, 0.0), wall_time)
        self.last_add = time.monotonic()

    def take(self, flush: bool = False) -> list[tuple[int, float | None, dict[str, Any]]]:
        """Steps complete now: all but the newest, and the newest too once quiet (or `flush`)."""
        if not self.pending:
            return []
        steps = sorted(self.pending)
        if not flush and time.monotonic() - self.last_add < QUIET_S:
            steps = steps[:-1]
        out = []
        for s in steps:
            out.append((s, self.times.pop(s, None), self.pending.pop(s)))
            self.done_through = s
        return out


class Source:
    """One adapted run: `poll()` -> new kit records; `manifest()` -> what the header shows."""

    format = "?"

    def __init__(self, root: Path, files_root: Path):
        self.root = root  # what the user named
        self.files_root = files_root  # the dir whose files are read
        self.table: Table = KIT
        self.framework_fixed = False
        self.version: str | None = None
        self.present: set[str] = set()
        self.extra: set[str] = set()
        self.assembler = StepAssembler()
        self.first_time: float | None = None
        self.last_growth = time.time()
        self._sizes: dict[str, int] = {}
        self._growth_seen = False
        self._newest_mtime = 0.0
        self.records_read = 0
        self.problem = ""

    # subclasses: read what is new into self.assembler; return the raw names seen
    def _read_new(self) -> None:
        raise NotImplementedError

    def _files(self) -> list[Path]:
        raise NotImplementedError

    def _set_framework(self, names: set[str]) -> None:
        if not self.framework_fixed and names:
            self.table = TABLES[guess_framework(names)]
            self.framework_fixed = True

    def poll(self, flush: bool = False) -> list[dict[str, Any]]:
        self._note_growth()
        self._read_new()
        out = []
        # files nobody wrote to for QUIET_S: their newest step is complete too
        flush = flush or time.time() - self._newest_mtime > QUIET_S
        for step, wall, raw in self.assembler.take(flush):
            self._set_framework(set(raw))
            rec = self.to_record(step, wall, raw)
            out.append(rec)
        self.records_read += len(out)
        return out

    def to_record(self, step: int, wall: float | None, raw: dict[str, Any]) -> dict[str, Any]:
        t = wall if wall is not None else time.time()
        if self.first_time is None:
            self.first_time = t
        rec: dict[str, Any] = {"step": step, "time": t}
        rec.update(map_metrics(self.table, raw))
        for k in rec:
            if k in METRICS or k in OWN_FIELDS:
                self.present.add(k)
            elif k not in ("step", "time"):
                self.extra.add(k)
        return rec

    def read_all(self) -> list[dict[str, Any]]:
        """Every record there is now (for the report and status)."""
        recs = self.poll(flush=True)
        while True:
            more = self.poll(flush=True)
            if not more:
                return recs
            recs.extend(more)

    def _note_growth(self) -> None:
        sizes, newest = {}, 0.0
        for f in self._files():
            try:
                st = os.stat(f)
            except OSError:
                continue
            sizes[str(f)] = st.st_size
            newest = max(newest, st.st_mtime)
        self._newest_mtime = newest
        if not self._growth_seen:  # first look: the files' own age says whether they are live
            self._growth_seen = True
            self.last_growth = newest or time.time()
        elif sizes != self._sizes:
            self.last_growth = time.time()
        self._sizes = sizes

    def status(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return "live" if now - self.last_growth < IDLE_AFTER_S else "idle"

    @property
    def label(self) -> str:
        name = self.table.label if self.table is not KIT else "metrics"
        return f"{name} {self.version}" if self.version else name

    def manifest(self) -> dict[str, Any]:
        fw = self.table.framework
        return {
            "run_id": self.root.name,
            "status": self.status(),
            "started_at": self.first_time,
            "adapter": {
                "format": self.format,
                "framework": fw,
                "label": self.label,
                "version": self.version,
                "path": str(self.root),
                "missing": missing_fields(self.present),
                "own_fields": sorted(self.present & set(OWN_FIELDS)),
                "extra": sorted(self.extra),
            },
        }


# -- TensorBoard -------------------------------------------------------------------------------------------


def _event_files(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.name.startswith("events.out.tfevents.") and _is_regular(p))
    except OSError:
        return []


def find_tb_dir(root: Path) -> Path | None:
    """The dir under `root` (depth <= MAX_DEPTH) holding the newest event file, or None."""
    best: tuple[float, Path] | None = None
    seen = 0
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                return best[1] if best else None
            if e.name.startswith("events.out.tfevents.") and e.is_file(follow_symlinks=False):
                m = e.stat(follow_symlinks=False).st_mtime
                if best is None or m > best[0]:
                    best = (m, Path(d))
            elif depth < MAX_DEPTH and e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                stack.append((Path(e.path), depth + 1))
    return best[1] if best else None


class TensorBoardSource(Source):
    format = "tensorboard"

    def __init__(self, root: Path, tb_dir: Path):
        super().__init__(root, tb_dir)
        self.loaders: dict[str, Any] = {}  # file -> its EventFileLoader's generator state
        self.text: dict[str, str] = {}

    def _files(self) -> list[Path]:
        return _event_files(self.files_root)

    def _read_new(self) -> None:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        for f in self._files():
            key = str(f)
            loader = self.loaders.get(key)
            if loader is None:
                loader = self.loaders[key] = EventFileLoader(key)
            for ev in loader.Load():  # reads from where the last call stopped
                self._event(ev)

    def _event(self, ev: Any) -> None:
        if not ev.HasField("summary"):
            return
        values: dict[str, float] = {}
        for v in ev.summary.value:
            x = _scalar(v)
            if x is None:
                if v.tag not in self.text and v.metadata.plugin_data.plugin_name == "text":
                    self.text[v.tag] = _text(v)
                    self._version_from_text(v.tag)
                continue
            values[v.tag] = x
        if values:
            self.assembler.add(int(ev.step), values, float(ev.wall_time))

    def _version_from_text(self, tag: str) -> None:
        """TRL's run config (transformers' TensorBoardCallback writes `args` as text) -> nothing
        versioned; a kit RunLogger or a user may write `versions` as JSON text."""
        if tag.endswith("versions"):
            try:
                v = json.loads(self.text[tag])
            except ValueError:
                return
            if isinstance(v, dict):
                fw = next((k for k in ("trl", "verl", "openrlhf") if k in v), None)
                if fw:
                    self.version = str(v[fw])


def _scalar(v: Any) -> float | None:
    if v.HasField("simple_value"):
        return float(v.simple_value)
    if v.HasField("tensor"):
        t = v.tensor
        if t.tensor_shape.dim:  # not a scalar
            return None
        for vals in (t.float_val, t.double_val, t.int_val, t.int64_val):
            if len(vals) == 1:
                return float(vals[0])
        if t.tensor_content and t.dtype in (1, 2):  # DT_FLOAT, DT_DOUBLE
            import struct

            fmt = "<f" if t.dtype == 1 else "<d"
            if len(t.tensor_content) == struct.calcsize(fmt):
                return float(struct.unpack(fmt, t.tensor_content)[0])
    return None


def _text(v: Any) -> str:
    try:
        return b"".join(v.tensor.string_val).decode("utf-8", "replace")
    except Exception:
        return ""


# -- JSONL lines (veRL file logger, mapped JSONL) ---------------------------------------------------------


class _LineReader:
    """Complete new lines of a growing file (a shrunk or replaced file is read again)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.ino: int | None = None
        self.buf = b""
        self.skipping = False
        self.long_lines = 0
        self.reset = False

    def lines(self) -> Iterator[bytes]:
        try:
            f = _open_regular(self.path)
        except FileNotFoundError:
            return
        with f:
            st = os.fstat(f.fileno())
            if self.ino is not None and (st.st_ino != self.ino or st.st_size < self.offset):
                self.offset, self.buf, self.skipping, self.reset = 0, b"", False, True
            self.ino = st.st_ino
            f.seek(self.offset)
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    return
                self.offset += len(chunk)
                data = self.buf + chunk
                parts = data.split(b"\n")
                self.buf = parts.pop()
                for p in parts:
                    if self.skipping:
                        self.skipping = False
                        continue
                    if len(p) <= MAX_LINE:
                        yield p
                    else:
                        self.long_lines += 1
                if len(self.buf) > MAX_LINE:
                    self.buf, self.skipping = b"", True
                    self.long_lines += 1


class VerlFileSource(Source):
    format = "verl-file"

    def __init__(self, root: Path, path: Path):
        super().__init__(root, path.parent)
        self.path = path
        self.reader = _LineReader(path)
        self.table = TABLES["verl"]
        self.framework_fixed = True
        self.bad_lines = 0

    def _files(self) -> list[Path]:
        return [self.path]

    def _read_new(self) -> None:
        for line in self.reader.lines():
            try:
                obj = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if not (isinstance(obj, dict) and isinstance(obj.get("step"), int) and isinstance(obj.get("data"), dict)):
                self.bad_lines += 1
                continue
            self.assembler.add(obj["step"], obj["data"], None)


def find_verl_file(d: Path) -> Path | None:
    """The newest *.jsonl under d (depth 2: <root>/<project>/<experiment>.jsonl) in veRL's format."""
    cands: list[tuple[float, Path]] = []
    for pattern in ("*.jsonl", "*/*.jsonl"):
        for p in d.glob(pattern):
            if _is_regular(p):
                cands.append((p.stat().st_mtime, p))
    for _, p in sorted(cands, reverse=True):
        if _is_verl_line(_first_line(p)):
            return p
    return None


# -- a JSONL or CSV with a mapping file ---------------------------------------------------------------------


class Mapping_:
    def __init__(self, path: Path):
        try:
            with _open_regular(path) as f:
                data = tomllib.loads(f.read(1 << 20).decode("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise SourceError(f"cannot read mapping {safe_text(path)}: {safe_text(str(e))}") from None
        self.path = path

        def s(key: str, default: str | None = None) -> str | None:
            v = data.get(key, default)
            if v is not None and not isinstance(v, str):
                raise SourceError(f"{safe_text(path)}: {key} must be a string")
            return v

        file = s("file")
        if not file:
            raise SourceError(f'{safe_text(path)}: no file = "..." naming the metrics JSONL or CSV')
        self.file = (path.parent / file).resolve() if not os.path.isabs(file) else Path(file)
        self.framework = s("framework")
        self.step = s("step", "step") or "step"
        self.time = s("time")
        names: dict[str, str] = {}
        for section, prefix in (("metrics", ""), ("stages", STAGE)):
            sec = data.get(section, {})
            if not isinstance(sec, dict):
                raise SourceError(f"{safe_text(path)}: [{section}] must be a table")
            for ours, theirs in sec.items():
                if not isinstance(theirs, str):
                    raise SourceError(f"{safe_text(path)}: {section}.{ours} must be a column name (a string)")
                if section == "metrics" and ours not in METRICS and ours not in OWN_FIELDS:
                    raise SourceError(f"{safe_text(path)}: {safe_text(ours)} is not a catalogue field")
                if section == "stages" and ours not in STAGES:
                    raise SourceError(f"{safe_text(path)}: stage {safe_text(ours)} is not one of {', '.join(STAGES)}")
                names[theirs] = prefix + ours
        self.table = Table("mapped", self.framework or "mapped", names)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _num(v: str) -> float | int | None:
    v = v.strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return None


class MappedSource(Source):
    format = "mapped"

    def __init__(self, root: Path, mapping: Mapping_):
        super().__init__(root, mapping.file.parent)
        self.mapping = mapping
        self.table = mapping.table
        self.framework_fixed = True
        self.reader = _LineReader(mapping.file)
        self.csv = mapping.file.suffix.lower() == ".csv"
        self.header: list[str] | None = None
        self.bad_lines = 0

    def _files(self) -> list[Path]:
        return [self.mapping.file]

    @property
    def label(self) -> str:
        return self.mapping.framework or "mapped metrics"

    def _read_new(self) -> None:
        if self.reader.reset:
            self.header, self.reader.reset = None, False
        for line in self.reader.lines():
            row = self._row(line)
            if row is None:
                continue
            step = row.pop(self.mapping.step, None)
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                self.bad_lines += 1
                continue
            wall = row.pop(self.mapping.time, None) if self.mapping.time else None
            wall = float(wall) if isinstance(wall, (int, float)) and math.isfinite(wall) else None
            self.assembler.add(step, row, wall)

    def _row(self, line: bytes) -> dict[str, Any] | None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if self.csv:
            cells = next(csv.reader([text]), [])
            if self.header is None:
                self.header = cells
                return None
            if not cells:
                return None
            return {h: x for h, c in zip(self.header, cells) if (x := _num(c)) is not None}
        try:
            obj = json.loads(text)
        except ValueError:
            self.bad_lines += 1
            return None
        if not isinstance(obj, dict):
            self.bad_lines += 1
            return None
        return _flatten(obj)


# -- detection -------------------------------------------------------------------------------------------


def is_kit_run_dir(path: str | os.PathLike[str]) -> bool:
    """A kit run dir (it has a run.json entry, whatever state that is in) or a runs dir (its
    `latest` link). A damaged one is the kit readers' to report (run.json is corrupt ...):
    never read it as another framework's run because its tb/ holds TensorBoard files."""
    p = Path(path)
    return os.path.lexists(p / "run.json") or os.path.lexists(p / "latest")


def detect(path: str | os.PathLike[str]) -> Source | None:
    """The adapted source at `path`, or None when it holds none of the formats (`LOOKED_FOR`),
    or when it is a kit run dir (`is_kit_run_dir`). Raises SourceError for a mapping file that
    is there but wrong."""
    p = Path(path)
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(st.st_mode):
        if p.suffix == ".toml":
            return MappedSource(p, Mapping_(p))
        if p.name.startswith("events.out.tfevents."):
            return TensorBoardSource(p.parent, p.parent)
        sibling = p.parent / MAPPING_FILE
        if _is_regular(sibling):
            m = Mapping_(sibling)
            if m.file == p.resolve():
                return MappedSource(p, m)
        if p.suffix == ".jsonl" and _is_verl_line(_first_line(p)):
            return VerlFileSource(p, p)
        return None
    if not stat.S_ISDIR(st.st_mode) or is_kit_run_dir(p):
        return None
    if _is_regular(p / MAPPING_FILE):
        return MappedSource(p, Mapping_(p / MAPPING_FILE))
    tb = find_tb_dir(p)
    if tb is not None:
        return TensorBoardSource(p, tb)
    verl = find_verl_file(p)
    if verl is not None:
        return VerlFileSource(p, verl)
    return None


def not_recognised(path: str | os.PathLike[str]) -> str:
    """The one line for a path that holds nothing recognisable."""
    return f"{safe_text(str(path))}: nothing to read here; looked for {LOOKED_FOR}"
