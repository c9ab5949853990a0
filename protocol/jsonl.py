"""The JSONL mirror (`steps.jsonl`, `events.jsonl`): one JSON object per line.

NaN and the infinities are written as the strings "NaN", "Infinity" and "-Infinity"
(never null: a NaN loss must stay visible) and read back as floats. Python's float
repr is the shortest string that round-trips, so every other float comes back exactly.
Readers take complete lines only: a torn last line is "not yet". A line over `MAX_LINE`
bytes is skipped and counted (readers keep going after it), and so is one that does not
parse. Files are opened only as regular files inside the run dir (`protocol.safeio`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .safeio import RunDirError, StrPath, open_run_fd, open_run_file

_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_FROM_STR = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


MAX_LINE = 1 << 20  # a line over 1 MiB (without its newline) is skipped, never parsed
_CHUNK = 1 << 20  # bytes read at a time
TAIL_BUDGET = 8 << 20  # bytes a JsonlTailer reads per poll at most


def _encode(v: Any) -> Any:
    if isinstance(v, float):
        if v != v:
            return "NaN"
        return _TO_STR.get(v, v)
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, str):
        return _FROM_STR.get(v, v)
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def dumps(record: dict[str, Any]) -> str:
    """One line of JSON (no newline), non-finite floats as strings."""
    return json.dumps(_encode(record), allow_nan=False, separators=(",", ":"))


def loads(line: str | bytes) -> Any:
    """A parsed JSON line (non-finite floats restored). Raises ValueError for anything that
    is not JSON, including nesting too deep to parse (RecursionError is turned into it)."""
    try:
        return _decode(json.loads(line))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


@dataclass
class LineStats:
    bad_lines: int = 0  # lines skipped: over MAX_LINE, not JSON, not UTF-8, or not an object
    long_lines: int = 0  # of those, lines over MAX_LINE (never read into memory whole)


class _LineSplitter:
    """Complete lines of a file from `offset` on, read in chunks; memory stays under about
    MAX_LINE + _CHUNK whatever the file holds. A line longer than MAX_LINE is counted and
    passed over without being kept (even while it is still being written)."""

    def __init__(self, stats: LineStats) -> None:
        self.offset = 0  # file offset of the first byte not consumed
        self.skipping = False  # inside an over-long line (already counted)
        self.stats = stats

    def lines(self, f: IO[bytes], size: int, budget: int | None = None) -> Iterator[tuple[int, int, bytes]]:
        """(start, end, line) for every complete line up to `size` (end is after the newline)."""
        pending = b""
        pos = self.offset  # file offset of pending[0]
        read_to = first = self.offset
        stats = self.stats
        while read_to < size and (budget is None or read_to - first < budget):
            f.seek(read_to)
            chunk = f.read(min(_CHUNK, size - read_to))
            if not chunk:
                break
            read_to += len(chunk)
            buf = pending + chunk if pending else chunk
            start = 0
            find = buf.find
            while True:
                nl = find(b"\n", start)
                if nl < 0:
                    break
                if self.skipping:
                    self.skipping = False  # the end of a line already counted
                elif nl - start > MAX_LINE:
                    stats.bad_lines += 1
                    stats.long_lines += 1
                else:
                    self.offset = pos + nl + 1
                    yield pos + start, pos + nl + 1, buf[start:nl]
                start = nl + 1
                self.offset = pos + start
            if self.skipping or len(buf) - start > MAX_LINE:
                if not self.skipping:
                    stats.bad_lines += 1
                    stats.long_lines += 1
                    self.skipping = True
                pending = b""
                pos = read_to
                self.offset = read_to
            else:
                pending = buf[start:]
                pos += start


def _parse(line: bytes, stats: LineStats) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        rec = loads(line.decode())
    except (ValueError, UnicodeDecodeError):
        stats.bad_lines += 1
        return None
    if not isinstance(rec, dict):
        stats.bad_lines += 1
        return None
    return rec


class JsonlWriter:
    """Appends one complete line per record with a single `write`, flushed at once.

    The file is opened by `protocol.safeio.open_run_fd` inside the run dir `root` (default:
    the file's directory): a symlink, FIFO or hard-linked file is refused (`RunDirError`).
    A record over MAX_LINE bytes is refused (ValueError): no reader would read it.
    """

    def __init__(self, path: StrPath, root: StrPath | None = None):
        self.path = Path(path)
        self.root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self._fd = open_run_fd(self.root, path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        data = (dumps(record) + "\n").encode()
        if len(data) - 1 > MAX_LINE:
            raise ValueError(f"record encodes to {len(data) - 1} bytes, over the {MAX_LINE} byte line limit")
        n = os.write(self._fd, data)
        while n < len(data):
            n += os.write(self._fd, data[n:])

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: StrPath, root: StrPath | None = None, stats: LineStats | None = None) -> list[dict[str, Any]]:
    """Every complete, parseable line that is a JSON object; [] if the file is missing.

    A torn last line is "not yet"; a bad line or one over MAX_LINE bytes is skipped and
    counted in `stats` (if given). Raises `RunDirError` (one line) if the file is not a
    regular file inside the run dir `root` (default: its directory), e.g. a symlink or FIFO.
    """
    stats = stats if stats is not None else LineStats()
    out: list[dict[str, Any]] = []
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    try:
        f = open_run_file(root, path, "rb", buffering=0)
    except FileNotFoundError:
        return out
    with f:
        size = os.fstat(f.fileno()).st_size
        for _s, _e, line in _LineSplitter(stats).lines(f, size):
            rec = _parse(line, stats)
            if rec is not None:
                out.append(rec)
    return out


class JsonlTailer:
    """Complete new lines of a growing JSONL file; re-reads from the start if it shrank.

    Never raises: lines that do not parse or are over MAX_LINE bytes are skipped and
    counted (`bad_lines`, of which `long_lines` over the limit), and the lines after them
    are read. If the file is refused (a symlink, a FIFO, outside the run dir), `poll`
    returns [] and `error` holds the one-line reason (None again once it opens).
    """

    def __init__(self, path: StrPath, root: StrPath | None = None):
        self.path = Path(path)
        self.root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self.stats = LineStats()
        self.error: str | None = None
        self._lines = _LineSplitter(self.stats)

    @property
    def bad_lines(self) -> int:
        return self.stats.bad_lines

    @property
    def long_lines(self) -> int:
        return self.stats.long_lines

    @property
    def offset(self) -> int:
        return self._lines.offset

    def poll(self) -> list[dict[str, Any]]:
        try:
            f = open_run_file(self.root, self.path, "rb", buffering=0)
        except RunDirError as e:
            self.error = str(e)
            return []
        except OSError:
            return []
        self.error = None
        out: list[dict[str, Any]] = []
        with f:
            try:
                size = os.fstat(f.fileno()).st_size
                if size < self._lines.offset:
                    self._lines.offset = 0
                    self._lines.skipping = False
                for _s, _e, line in self._lines.lines(f, size, TAIL_BUDGET):
                    rec = _parse(line, self.stats)
                    if rec is not None:
                        out.append(rec)
            except OSError:
                pass
        return out


def truncate_after_step(path: StrPath, step: int, root: StrPath | None = None) -> list[dict[str, Any]]:
    """Cut a steps.jsonl after the last line with step <= `step`; return the cut records."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    try:
        f = open_run_file(root, path, "r+b", buffering=0)
    except FileNotFoundError:
        return []
    removed: list[dict[str, Any]] = []
    with f:
        size = os.fstat(f.fileno()).st_size
        keep = 0
        stats = LineStats()
        for _s, end, line in _LineSplitter(stats).lines(f, size):
            rec = _parse(line, stats)
            s = rec.get("step") if rec is not None else None
            if not removed and isinstance(s, int) and not isinstance(s, bool) and s <= step:
                keep = end
            elif rec is not None:
                removed.append(rec)
        if keep < size:
            f.truncate(keep)
            os.fsync(f.fileno())
    return removed
